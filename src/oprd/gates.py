"""Evaluation gates: thresholds a run's validation must meet before its student ships.

A gate is one line, in one of three forms (`>=` or `<=`):

    "val/aime24/avg@16 >= 45"              an absolute threshold
    "val/aime24/avg@16 >= start + 5"       relative to the student's own step-0 validation
    "val/aime24/avg@16 >= teacher - 2"     relative to the teacher's validation on the same problems

  parse_gate      a gate line -> Gate (a GateError names the line and what is wrong)
  judge           every gate against one validation record -> GateResult per gate
  GateLog         gates.json: every judged validation of a run, and its verdict (`oprd gate RUN`)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from oprd.files import JsonFile

GATES_FILE = "gates.json"
_GATE = re.compile(r"^\s*(?P<metric>\S+)\s*(?P<op>>=|<=)\s*(?:(?P<base>start|teacher)\s*(?P<sign>[+-])\s*)?"
                   r"(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
BASES = ("start", "teacher")


class GateError(ValueError):
    """A gate line that cannot be read, or a metric a run does not report."""


@dataclass(frozen=True)
class Gate:
    text: str  # as written
    metric: str
    op: str  # >= | <=
    number: float
    base: str | None = None  # None (absolute) | start | teacher

    def threshold(self, baselines: dict[str, dict[str, float]]) -> float:
        """The value the metric is compared with: the number, or the baseline's value plus/minus it."""
        if self.base is None:
            return self.number
        baseline = baselines.get(self.base, {})
        if self.metric not in baseline:
            raise GateError(f"gate {self.text!r} is relative to the {self.base}'s {self.metric}, which was not "
                            "measured")
        return baseline[self.metric] + self.number


def parse_gate(text: str) -> Gate:
    """`METRIC >= NUMBER`, `METRIC >= start + NUMBER` or `METRIC >= teacher - NUMBER` (or `<=`)."""
    match = _GATE.match(text) if isinstance(text, str) else None
    if match is None:
        raise GateError(f"gate {text!r} is not of the form 'METRIC >= NUMBER', 'METRIC >= start + NUMBER' or "
                        "'METRIC >= teacher - NUMBER' (or <=), e.g. 'val/aime24/avg@4 >= start + 5'")
    number = float(match["number"])
    if match["base"] and match["sign"] == "-":
        number = -number
    return Gate(text.strip(), match["metric"], match["op"], number, match["base"])


@dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    value: float | None  # None: the validation did not report the metric
    threshold: float
    passed: bool


def judge(gates: list[Gate], metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> list[GateResult]:
    """Each gate against one validation record; a metric the record lacks fails its gate."""
    results = []
    for gate in gates:
        threshold = gate.threshold(baselines)
        value = metrics.get(gate.metric)
        passed = value is not None and (value >= threshold if gate.op == ">=" else value <= threshold)
        results.append(GateResult(gate.text, gate.metric, value, threshold, passed))
    return results


class GateLog:
    """gates.json in a run folder: the gates, the baselines they are relative to, and every judged
    validation ({step, final, results}); a resumed run keeps the judgements of steps before it."""

    def __init__(self, run_dir: Path):
        self.file = JsonFile(Path(run_dir) / GATES_FILE, lambda: {"gates": [], "baselines": {}, "evaluations": []})

    def read(self) -> dict:
        return self.file.read()

    def start(self, gates: list[Gate], resume_step: int) -> None:
        """Opens the log for a run (segment) starting after `resume_step`: earlier judgements and the
        baselines measured before are kept."""
        log = self.read()
        kept = [e for e in log["evaluations"] if e["step"] <= resume_step]
        log.update(gates=[g.text for g in gates], evaluations=kept)
        self.file.write()

    def set_baseline(self, name: str, metrics: dict[str, float]) -> None:
        """What relative gates compare with: the student's step-0 validation (start) or the teacher's."""
        self.read()["baselines"][name] = {key: value for key, value in metrics.items() if key.startswith("val/")}
        self.file.write()

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        return self.read()["baselines"]

    def record(self, step: int, results: list[GateResult], final: bool) -> None:
        log = self.read()
        log["evaluations"] = [e for e in log["evaluations"] if e["step"] != step]
        log["evaluations"].append({"step": step, "final": final, "passed": all(r.passed for r in results),
                                   "results": [asdict(r) for r in results]})
        self.file.write()


def verdict(run_dir: Path) -> tuple[int, dict | None]:
    """`oprd gate`'s exit code for a run and the evaluation it judged: 0 when every gate passed at
    the run's last judged validation, 1 when one failed, 2 when there is nothing to judge (no gates
    or no validation)."""
    log = GateLog(run_dir).read()
    if not log["gates"] or not log["evaluations"]:
        return 2, None
    last = max(log["evaluations"], key=lambda e: e["step"])
    return (0 if last["passed"] else 1), last
