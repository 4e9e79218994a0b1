"""The package installs under its own name on the index, with the module and command `rulegraph`."""

from importlib import metadata


def test_distribution_name_is_ours():
    dist = metadata.distribution("rulegraph-onnx")
    assert dist.metadata["Name"] == "rulegraph-onnx"
    assert any(ep.name == "rulegraph" and ep.value == "rulegraph.cli:main" for ep in dist.entry_points)


def test_readme_installs_the_right_name():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert 'pip install "rulegraph[' not in readme
    assert 'pip install "rulegraph-onnx[cpu]"' in readme
