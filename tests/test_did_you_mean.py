"""The did-you-mean hint of every located error: a choice equal but for case wins, else the closest."""

import pytest

from rulegraph.errors import did_you_mean

OPS = ["Relu", "Selu", "Elu", "Gemm", "MatMul", "Softmax", "LogSoftmax"]


@pytest.mark.parametrize("word, hint", [
    ("relu", " (did you mean 'Relu'?)"),          # case only: not the nearer-by-letters 'Selu'
    ("RELU", " (did you mean 'Relu'?)"),
    ("Reluu", " (did you mean 'Relu'?)"),
    ("softmax", " (did you mean 'Softmax'?)"),
    ("Gem", " (did you mean 'Gemm'?)"),
    ("Convolution", ""),
])
def test_hint(word, hint):
    assert did_you_mean(word, OPS) == hint
