"""Which max-pool variant ``deeplift-rescale`` uses by default: the one that equals Captum's
DeepLift (the reference, [crosscheck] extra) on a plain Conv-ReLU-MaxPool CNN, with the bundled
file unedited. Captum's max-pool rule gives all of ``y − y'`` to the arg-max of the side with the
larger max: our ``max = "softness"``; ``max = "relu"`` also conserves but spreads it over the
window's cells, and is kept as an option documented in the file."""

from __future__ import annotations

import numpy as np
import pytest
from test_crosscheck import row_errors

from rulegraph import Explainer
from rulegraph.run import rulefiles as dsl

TARGETS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def cnn(torch, tm, tmp_path_factory):
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.r1, self.p1 = nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.c2, self.r2, self.p2 = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.flat, self.fc = nn.Flatten(), nn.Linear(8 * 3 * 3, 10)

        def forward(self, x):
            return self.fc(self.flat(self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x))))))))

    model = tm.seeded(Net, seed=0)
    x = np.random.default_rng(1).normal(size=(4, 1, 12, 12)).astype(np.float32)
    path = tm.export_onnx(model, torch.tensor(x), tmp_path_factory.mktemp("crp") / "crp.onnx", dynamo=False)
    return model, path, x


#: rule file -> does it equal Captum's DeepLift (to 1e-4 of the row's max |reference|)?
ROWS = {"deeplift-rescale": True,  # the bundled file as shipped
        'max -> baseline_difference(max = "relu")': False}


@pytest.mark.parametrize("rules", list(ROWS))
def test_bundled_deeplift_default_is_captums(rules, cnn, captum_attr, torch, tm):
    """Captum runs with its hooked modules separated (``separate_nonlinear_modules``: stock captum
    0.9 mishandles a ReLU that feeds a MaxPool2d directly, see tests/test_deeplift.py). Measured:
    the bundled file 2.4e-7; the relu variant 0.37."""
    model, path, x = cnn
    ruleset = rules if rules in dsl.bundled_rule_names() else dsl.parse(
        f'rulegraph 1\ninclude "deeplift-rescale"\n{rules}\n', source="relu.rules")
    xt = torch.tensor(x)
    ref = captum_attr.DeepLift(tm.separate_nonlinear_modules(model)).attribute(
        xt, baselines=torch.zeros_like(xt), target=TARGETS).detach().numpy()
    result = Explainer(path, ruleset).explain(x, target=TARGETS)
    err = row_errors(result.map, ref).max()
    print(f"\n[crosscheck] {rules} vs captum DeepLift on Conv-ReLU-MaxPool: max rel err {err:.2e}")
    assert bool(err <= 1e-4) is ROWS[rules]
    np.testing.assert_allclose(result.relative_delta, 0, atol=1e-5)  # both variants conserve
