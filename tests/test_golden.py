"""Golden losses: each smoke recipe (one per objective), seeded, on CPU, must reproduce the losses
and gradient norms pinned here to 1e-5, so no refactor can move the numbers silently.

The numbers were recorded from `oprd train recipes/smoke/<recipe>.yaml` before the package was
restructured, and are unchanged by it. A deliberate change to the numerics (a new sampling rule, a
new model shape in the smoke assets) updates them in the same commit, with the reason."""

import json
from pathlib import Path

import pytest

from oprd.config import load_config
from oprd.trainer import train

SMOKE = Path(__file__).resolve().parents[1] / "recipes" / "smoke"

GOLDEN = {  # recipe -> [(loss, grad_norm) at steps 1, 2, 3]
    "oprd": [(0.030635141767561436, 0.07639501988887787), (0.02852438949048519, 0.0578952357172966),
             (0.026350224390625954, 0.04156595841050148)],
    "opd_sampled": [(0.03080160915851593, 0.40005749464035034), (0.010277114808559418, 0.47072580456733704),
                    (0.05734827369451523, 0.46211257576942444)],
    "opd_topk": [(0.01447372417896986, 0.12964452803134918), (0.012473819311708212, 0.16744652390480042),
                 (0.011124652344733477, 0.16112063825130463)],
    "opd_full": [(0.025418732315301895, 0.050583988428115845), (0.023629981093108654, 0.09710842370986938),
                 (0.01819639839231968, 0.05371598154306412)],
    "oprd_plus_opd": [(0.33715301752090454, 0.8837342858314514), (0.29161664843559265, 0.6886035203933716),
                      (0.2990085184574127, 0.5508359670639038)],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(GOLDEN))
def test_smoke_recipe_reproduces_its_golden_losses(recipe, tmp_path):
    run_dir = train(load_config(SMOKE / f"{recipe}.yaml", [f"output_dir={tmp_path / recipe}", "save_every=0"]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [(row["loss"], row["grad_norm"]) for row in rows]
    assert len(got) == len(GOLDEN[recipe])
    for step, ((loss, norm), (want_loss, want_norm)) in enumerate(zip(got, GOLDEN[recipe]), 1):
        assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-7), (recipe, step, "loss")
        assert norm == pytest.approx(want_norm, rel=1e-5, abs=1e-7), (recipe, step, "grad_norm")
