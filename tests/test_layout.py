"""The package's architecture, read from its imports: the library core never uses the experiments,
the offline fixtures or the CLI, and no module imports itself in a circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "oprd"
PROGRAMS = ("oprd.experiments", "oprd.cli", "oprd.__main__")  # use the library, never used by it
FIXTURES = "oprd.testing"  # for tests, smoke assets and experiments only


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The oprd modules `name` imports anywhere in its file, with the packages those imports run
    (importing oprd.bridge.projector first runs oprd/bridge/__init__.py, unless the importer is
    inside oprd.bridge already)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                       for alias in node.names]
        for target in targets:
            if not target.startswith("oprd"):
                continue
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):  # every package on the way runs, then the module
                package = ".".join(parts[:depth])
                if package in modules and not (name + ".").startswith(package + ".") and package != name:
                    found.add(package)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_program(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PROGRAMS)


def test_the_graph_sees_the_packages_faces():
    graph = _graph()
    assert "oprd.bridge" in graph["oprd.trainer"]  # `from oprd.bridge import ...`
    assert "oprd.bridge.projector" in graph["oprd.objective"] and "oprd.bridge" in graph["oprd.objective"]
    assert "oprd.bridge" not in graph["oprd.bridge.stage1"]  # inside its own package


def test_the_core_never_imports_programs_or_fixtures():
    offending = {
        name: sorted(t for t in targets if _is_program(t) or t == FIXTURES)
        for name, targets in _graph().items()
        if not _is_program(name) and name != FIXTURES
    }
    assert {name: t for name, t in offending.items() if t} == {}


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_training_loop_reads_as_timed_phases():
    """train() calls the step's phases by name, each timed under the name its time/<phase>_s metric
    carries, and no function of trainer.py runs past 60 lines."""
    tree = ast.parse((PACKAGE / "trainer.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {name: node.end_lineno - node.lineno + 1 for name, node in functions.items()
            if node.end_lineno - node.lineno + 1 > 60} == {}
    phases = [call.args[1].value for call in ast.walk(functions["train"]) if isinstance(call, ast.Call)
              and getattr(call.func, "id", None) == "timed"]
    called = {call.func.id for call in ast.walk(functions["train"])
              if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)}
    assert phases == ["sample", "update", "validate"] and {*phases, "record", "save"} <= called
    assert {"sample", "update", "validate"} <= set(functions)


def test_the_config_checks_read_section_by_section():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {name: node.end_lineno - node.lineno + 1 for name, node in functions.items()
            if node.end_lineno - node.lineno + 1 > 60} == {}
    calls = [call for call in ast.walk(functions["validate"]) if isinstance(call, ast.Call)]
    called = [c.func.id for c in calls if isinstance(c.func, ast.Name) and c.func.id.startswith("validate_")]
    assert called == ["validate_run", "validate_models", "validate_data", "validate_rollout", "validate_objective",
                      "validate_stages", "validate_optim", "validate_eval", "validate_gates"]


def test_the_trainer_never_loads_stage_1():
    """The trainer reads the bridge's projectors only; Stage 1 (its rollouts and row reservoir)
    loads when one of its names is first used."""
    import subprocess
    import sys

    probe = ("import sys, oprd.trainer; before = 'oprd.bridge.stage1' in sys.modules; "
             "from oprd.bridge import layer_pairs; print(before, 'oprd.bridge.stage1' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["False", "True"]


def test_the_run_folder_package_imports_only_what_lies_below_it():
    """`oprd.runs` (the folder, its files, checkpoints, reports) sits under the trainer and the CLI:
    an import of the trainer, the rollout, the objective or the teachers from it would run back up."""
    below = {"oprd.config", "oprd.models", "oprd.files", "oprd.gates", "oprd.display", "oprd.distributed", "oprd.runs"}
    graph = _graph()
    package = {name: targets for name, targets in graph.items() if name.startswith("oprd.runs.")}
    assert set(package) == {f"oprd.runs.{m}" for m in ("folder", "recorder", "provenance", "checkpoint", "report")}
    assert {name: sorted(t for t in targets if t not in below and not t.startswith("oprd.runs."))
            for name, targets in package.items()} == {name: [] for name in package}


def test_the_report_functions_keep_their_first_public_path():
    from oprd import run_report
    from oprd.runs import report

    assert all(getattr(run_report, name) is getattr(report, name) for name in run_report.__all__)
