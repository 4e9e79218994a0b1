"""Fixtures shared by the test tables: onnxruntime call counting, and the optional torch/captum
references (the [crosscheck] extra), which skip with a clear reason when absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/torch_models.py, tests/oracles.py


@pytest.fixture
def ort_runs(monkeypatch):
    """A list that grows by one per onnxruntime run (``InferenceSession.run``, or
    ``run_with_iobinding``, which rulegraph's runs go through)."""
    import onnxruntime

    calls = []
    for method in ("run", "run_with_iobinding"):
        real = getattr(onnxruntime.InferenceSession, method)

        def counting(self, *args, real=real, **kwargs):
            calls.append(1)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(onnxruntime.InferenceSession, method, counting)
    return calls


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="the reference implementations need the [crosscheck] extra (torch)")


@pytest.fixture(scope="module")
def captum_attr(torch):
    pytest.importorskip("captum", reason="the reference implementations need the [crosscheck] extra (captum)")
    import captum.attr

    return captum.attr


@pytest.fixture(scope="module")
def tm(torch):
    """tests/torch_models.py: small seeded torch networks and Captum helpers."""
    import torch_models

    return torch_models
