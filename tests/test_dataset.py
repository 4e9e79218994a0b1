"""Dataset runs (run/dataset.py sources, run/shards.py writing): each source gives the rows one
``Explainer.explain`` of the stacked samples gives; an interrupted run resumed writes the files an
uninterrupted run writes, byte for byte; errors name the file or row; the batch size follows the
memory budget by its formula."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from rulegraph import Explainer
from rulegraph.cli import main
from rulegraph.errors import RulegraphError, RulegraphWarning
from rulegraph.run import shards
from rulegraph.run.dataset import open_source
from rulegraph.run.inputs import load_input
from rulegraph.run.shards import batch_size_for, read_outputs

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"
NEEDS_PYARROW = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None,
                                   reason="parquet needs the [dataset] extra (pyarrow)")
FORMATS = ["npz", pytest.param("parquet", marks=NEEDS_PYARROW)]


def _pyarrow():
    return pytest.importorskip("pyarrow", reason="parquet needs the [dataset] extra (pyarrow)")


@pytest.fixture(scope="module")
def explainer():
    return Explainer(CNN, "lrp-epsilon")


@pytest.fixture(scope="module")
def samples():
    """23 digit-like 8x8 grey samples in [0, 1] (seeded)."""
    return np.random.default_rng(7).random((23, 1, 8, 8), dtype=np.float32)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(array[0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_pngs(folder: Path, samples) -> list[Path]:
    """Images in two sub-folders (a recursive walk needed); returned in sorted path order."""
    paths = []
    for i, sample in enumerate(samples):
        path = folder / ("even" if i % 2 == 0 else "odd") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(sample))
        paths.append(path)
    return sorted(paths)


def _make(kind: str, tmp: Path, samples, explainer):
    """(the dataset argument, the ids it must give, the samples as the reference reader reads them)."""
    if kind == "folder":
        paths = _write_pngs(tmp / "images", samples)
        return tmp / "images", [p.relative_to(tmp / "images").as_posix() for p in paths], \
            np.concatenate([load_input(p, explainer) for p in paths])
    if kind == "glob":  # 001, 011, 021: odd/ only, named relative to the pattern's fixed folder
        paths = [p for p in _write_pngs(tmp / "images", samples) if p.name.endswith("1.png")]
        return str(tmp / "images" / "*" / "*1.png"), [f"odd/{i:03d}.png" for i in (1, 11, 21)], \
            np.concatenate([load_input(p, explainer) for p in paths])
    if kind == "npy":
        np.save(tmp / "x.npy", samples)
        return tmp / "x.npy", [f"x.npy:{i}" for i in range(len(samples))], samples
    if kind == "npy-glob":
        np.save(tmp / "a.npy", samples[:10])
        np.save(tmp / "b.npy", samples[10:])
        return str(tmp / "*.npy"), [f"a.npy:{i}" for i in range(10)] + [f"b.npy:{i}" for i in range(13)], samples
    if kind == "npz":
        np.savez(tmp / "x.npz", x=samples, y=np.arange(len(samples)))
        return tmp / "x.npz", [f"x.npz:{i}" for i in range(len(samples))], samples
    if kind == "iterable":
        return (s for s in samples), [str(i) for i in range(len(samples))], samples
    if kind == "pairs":
        return [(f"s{i}", s) for i, s in enumerate(samples)], [f"s{i}" for i in range(len(samples))], samples
    pa = _pyarrow()
    import pyarrow.parquet as pq

    if kind == "parquet-images":
        names = [f"img{i}" for i in range(len(samples))]
        table = pa.table({"id": names, "image": [_png(s) for s in samples]})
        pq.write_table(table, tmp / "t.parquet", row_group_size=6)
        images = [Image.open(io.BytesIO(_png(s))) for s in samples]
        return tmp / "t.parquet", names, np.concatenate([_preprocessed(i, explainer) for i in images])
    if kind == "parquet-tensors":
        table = pa.table({"label": np.arange(len(samples)), "pixels": [s.ravel().tolist() for s in samples]})
        pq.write_table(table, tmp / "t.parquet", row_group_size=5)
        return tmp / "t.parquet", [f"t.parquet:{i}" for i in range(len(samples))], samples
    raise AssertionError(kind)


def _preprocessed(image, explainer):
    from rulegraph.run.preprocess import Preprocess, preprocess

    return preprocess(image, Preprocess(), 1, (8, 8))


SOURCES = ["folder", "glob", "npy", "npy-glob", "npz", "iterable", "pairs",
           pytest.param("parquet-images", marks=NEEDS_PYARROW),
           pytest.param("parquet-tensors", marks=NEEDS_PYARROW)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", SOURCES)
def test_each_source_gives_the_rows_of_one_explain(kind, fmt, tmp_path, samples, explainer):
    """Oracle: ``explain`` of the samples stacked as the single-file reader reads them, one batch."""
    data, ids, arrays = _make(kind, tmp_path, samples, explainer)
    summary = explainer.explain_dataset(data, tmp_path / "out", format=fmt, shard_size=7, batch_size=3,
                                        progress=False, max_amplification=None)
    got = read_outputs(tmp_path / "out")
    want = explainer.explain(arrays, max_amplification=None)
    assert got["id"].tolist() == ids
    np.testing.assert_array_equal(got["attribution"], want.map)
    np.testing.assert_array_equal(got["target"], want.target)
    np.testing.assert_array_equal(got["start_value"], want.start_value.astype(np.float64))
    np.testing.assert_array_equal(got["logit"], want.start[np.arange(len(ids)), want.target].astype(np.float64))
    np.testing.assert_array_equal(got["delta"], want.delta)
    np.testing.assert_array_equal(got["attribution_shape"], np.tile([1, 8, 8], (len(ids), 1)))
    relative = np.abs(want.delta) / np.abs(want.start_value.astype(np.float64))
    assert (summary.samples, summary.shards) == (len(ids), -(-len(ids) // 7))
    assert summary.worst_delta == relative.max() and summary.median_delta == np.median(relative)
    assert summary.worst_id == ids[int(np.argmax(relative))]


def _interrupting(samples, after: int):
    for i, sample in enumerate(samples):
        if i == after:
            raise KeyboardInterrupt
        yield sample


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("after", [0, 5, 13, 22])
def test_interrupted_then_resumed_equals_uninterrupted_byte_for_byte(fmt, after, tmp_path, samples, explainer):
    """Shards of 5: an interrupt after ``after`` samples keeps ``after // 5`` finished shards, no
    temporary file; the rerun skips them and the folder equals an uninterrupted run's."""
    options = {"format": fmt, "shard_size": 5, "batch_size": 2, "progress": False, "max_amplification": None}
    explainer.explain_dataset(list(samples), tmp_path / "whole", **options)
    with pytest.raises(KeyboardInterrupt):
        explainer.explain_dataset(_interrupting(samples, after), tmp_path / "cut", **options)
    finished = sorted(p.name for p in (tmp_path / "cut").glob("part-*"))
    assert finished == [f"part-{k:05d}.{fmt}" for k in range(after // 5)]
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")]
    for name in finished:  # each finished shard is complete and equal to the uninterrupted one
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    summary = explainer.explain_dataset(list(samples), tmp_path / "cut", **options)
    assert summary.resumed == after // 5 and summary.samples == len(samples)
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


SIGINT_SCRIPT = """
import os, signal, sys
import rulegraph.run.dataset as dataset
from rulegraph.cli import main
real, seen = dataset._image, []
def image(*args):
    seen.append(1)
    if len(seen) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args)
dataset._image = image
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigint_to_the_cli_leaves_finished_shards_and_a_resume_completes_them(fmt, tmp_path, samples):
    """A real SIGINT (Ctrl-C) to ``rulegraph explain`` half-way: exit 130, the shards finished before
    it intact, and the resumed run's folder equals an uninterrupted run's byte for byte."""
    _write_pngs(tmp_path / "images", samples)
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(tmp_path / "images"), "--format", fmt,
            "--shard-size", "4", "--batch-size", "2", "--quiet", "--max-amplification", "1e9"]
    assert main([*argv, "-o", str(tmp_path / "whole")]) == 0
    cut = subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, "11", *argv, "-o", str(tmp_path / "cut")],
                         capture_output=True, text=True, timeout=300)
    assert cut.returncode == 130, cut.stderr
    assert "interrupted" in cut.stderr
    assert sorted(p.name for p in (tmp_path / "cut").glob("part-*")) == [f"part-{k:05d}.{fmt}" for k in (0, 1)]
    assert main([*argv, "-o", str(tmp_path / "cut")]) == 0
    assert _files(tmp_path / "cut") == _files(tmp_path / "whole")


def _corrupt_png(tmp, samples):
    _write_pngs(tmp / "images", samples[:4])
    bad = tmp / "images" / "odd" / "001.png"
    bad.write_bytes(bad.read_bytes()[:30])
    return tmp / "images", "odd/001.png is not a readable image"


def _mixed_shapes(tmp, samples):
    np.save(tmp / "a.npy", samples[:3])
    np.save(tmp / "b.npy", np.zeros((2, 1, 9, 9), np.float32))
    return str(tmp / "*.npy"), "b.npy:0: shape [1, 9, 9] differs from a.npy:2's [1, 8, 8]"


def _truncated_npy(tmp, samples):
    np.save(tmp / "x.npy", samples)
    (tmp / "x.npy").write_bytes((tmp / "x.npy").read_bytes()[:-10])
    return tmp / "x.npy", "x.npy is truncated"


def _nan_row(tmp, samples):
    bad = samples.copy()
    bad[4, 0, 2, 3] = np.nan
    np.save(tmp / "x.npy", bad)
    return tmp / "x.npy", "x.npy row 4 holds 1 NaN or infinite values (the first at index (0, 2, 3))"


def _null_image(tmp, samples):
    pa = _pyarrow()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png(samples[0]), None]}), tmp / "t.parquet")
    return tmp / "t.parquet", "t.parquet row 1 (column 'image') is empty (null)"


def _bad_image_bytes(tmp, samples):
    pa = _pyarrow()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png(samples[0]), b"not an image"]}), tmp / "t.parquet")
    return tmp / "t.parquet", "t.parquet row 1 (column 'image') is not a readable image"


def _wrong_length(tmp, samples):
    pa = _pyarrow()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [[0.5] * 64, [0.5] * 63]}), tmp / "t.parquet")
    return tmp / "t.parquet", "t.parquet row 1 (column 'pixels') holds 63 values; input 'input' takes [1, 8, 8]"


def _empty_folder(tmp, samples):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("x")
    return tmp / "empty", "empty: the folder holds no images, .npy or .npz files"


def _no_match(tmp, samples):
    return str(tmp / "*.npy"), "*.npy: no file matches the pattern"


def _unknown_in_glob(tmp, samples):
    (tmp / "a.txt").write_text("x")
    return str(tmp / "a.*"), "a.txt: unknown input format '.txt'"


ERRORS = [_corrupt_png, _mixed_shapes, _truncated_npy, _nan_row, _empty_folder, _no_match, _unknown_in_glob,
          pytest.param(_null_image, marks=NEEDS_PYARROW),
          pytest.param(_bad_image_bytes, marks=NEEDS_PYARROW),
          pytest.param(_wrong_length, marks=NEEDS_PYARROW)]


@pytest.mark.parametrize("make", ERRORS)
def test_errors_name_the_bad_file_or_row(make, tmp_path, samples, explainer, capsys):
    data, expected = make(tmp_path, samples)
    with pytest.raises(RulegraphError) as caught:
        explainer.explain_dataset(data, tmp_path / "out", format="npz", shard_size=4, batch_size=2, max_amplification=None,
                                  progress=False)
    assert expected in str(caught.value)
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(data), "-o", str(tmp_path / "out2"),
            "--format", "npz", "--shard-size", "4", "--batch-size", "2", "--quiet"]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


RUN_ERRORS = [
    ({"shard_size": 6}, "holds a run computed with other settings (shard_size: 5 there, 6 now)"),
    ({"target": 3}, "holds a run computed with other settings (target: \"'argmax'\" there, '3' now)"),
    ({"target": [1, 2]}, "a dataset run explains one target for every sample"),
    ({"format": "csv"}, "unknown output format 'csv'; formats: parquet, npz"),
]


@pytest.mark.parametrize("change, expected", RUN_ERRORS)
def test_a_rerun_with_other_settings_is_refused(change, expected, tmp_path, samples, explainer):
    options = {"format": "npz", "shard_size": 5, "batch_size": 2, "progress": False, "max_amplification": None}
    explainer.explain_dataset(list(samples[:6]), tmp_path / "out", **options)
    before = _files(tmp_path / "out")
    with pytest.raises(RulegraphError) as caught:
        explainer.explain_dataset(list(samples[:6]), tmp_path / "out", **{**options, **change})
    assert expected in str(caught.value)
    assert _files(tmp_path / "out") == before


def test_a_changed_dataset_is_refused_naming_the_shard(tmp_path, samples, explainer):
    options = {"format": "npz", "shard_size": 5, "batch_size": 2, "progress": False, "max_amplification": None}
    explainer.explain_dataset([(f"a{i}", s) for i, s in enumerate(samples[:6])], tmp_path / "out", **options)
    with pytest.raises(RulegraphError, match=r"part-00000.npz holds other samples than the source gives now "
                                             r"\(from sample 2: 'a2' there, 'b2' now\)"):
        explainer.explain_dataset([(("a" if i < 2 else "b") + str(i), s) for i, s in enumerate(samples[:6])],
                                  tmp_path / "out", **options)


def test_the_output_folder_may_not_be_inside_the_input_folder(tmp_path, samples, explainer):
    _write_pngs(tmp_path / "images", samples[:2])
    with pytest.raises(RulegraphError, match="is inside the input folder"):
        explainer.explain_dataset(tmp_path / "images", tmp_path / "images" / "out", progress=False)


def test_without_pyarrow_parquet_names_the_extra(monkeypatch, tmp_path, samples, explainer):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RulegraphError, match=r'needs pyarrow: pip install "rulegraph-onnx\[dataset\]"'):
        explainer.explain_dataset(list(samples[:2]), tmp_path / "out", format="parquet", progress=False)
    summary = explainer.explain_dataset(list(samples[:2]), tmp_path / "out2", format="npz", progress=False,
                                        max_amplification=None)
    assert summary.samples == 2


def _gemm_model(static_batch=None) -> onnx.ModelProto:
    """x [N, 4] -> Gemm -> y [N, 3] -> Relu -> z [N, 3]: per row 16 + 12 + 12 bytes carry the batch."""
    batch = static_batch or "N"
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1), helper.make_node("Relu", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 4], np.ones(12)),
         helper.make_tensor("b", TensorProto.FLOAT, [3], np.zeros(3))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


BUDGETS = [  # (static batch, budget bytes, expected: budget // (3 * (16 + 12 + 12) + 2 * 16) rounded to the batch)
    (None, 152 * 10, 10),
    (None, 152 * 1000, shards.MAX_BATCH_SIZE),
    (4, 152 * 1000, shards.MAX_BATCH_SIZE),
    (None, 152 * 10 + 151, 10),
    (None, 100, 1),
    (4, 152 * 10, 8),
    (4, 100, 4),
]


@pytest.mark.parametrize("static, budget, expected", BUDGETS)
def test_the_batch_size_follows_the_memory_budget(static, budget, expected):
    explainer = Explainer(_gemm_model(static), "gradient")
    assert batch_size_for(explainer, 16, budget) == expected


def test_the_progress_bar_is_on_only_at_a_terminal(monkeypatch):
    tqdm = pytest.importorskip("tqdm", reason="the progress bar needs the [dataset] extra (tqdm)")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = shards.progress_bar(10, None)
    assert isinstance(bar, tqdm.tqdm)
    bar.close()
    assert isinstance(shards.progress_bar(10, False), shards._NoBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(shards.progress_bar(10, None), shards._NoBar)


def test_warnings_name_the_samples(tmp_path, samples, explainer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explainer.explain_dataset([(f"s{i}", s) for i, s in enumerate(samples[:4])], tmp_path / "out",
                                  format="npz", batch_size=2, progress=False, max_amplification=1e-9)
    messages = [str(w.message) for w in caught if issubclass(w.category, RulegraphWarning)]
    assert [m.split(":")[0] for m in messages] == ["samples s0 .. s1", "samples s2 .. s3"]


def test_a_resumed_run_reads_only_the_unfinished_shards(tmp_path, samples, explainer, monkeypatch):
    """10 images in shards of 4, shard 1 deleted: the rerun reads its 4 images and the first one
    (which sizes the batch), nothing else."""
    import rulegraph.run.dataset as dataset

    _write_pngs(tmp_path / "images", samples[:10])
    options = {"format": "npz", "shard_size": 4, "batch_size": 2, "progress": False, "max_amplification": None}
    explainer.explain_dataset(tmp_path / "images", tmp_path / "out", **options)
    whole = _files(tmp_path / "out")
    (tmp_path / "out" / "part-00001.npz").unlink()
    read, real = [], dataset._image
    monkeypatch.setattr(dataset, "_image", lambda path, *rest: read.append(path.name) or real(path, *rest))
    explainer.explain_dataset(tmp_path / "images", tmp_path / "out", **options)
    ordered = sorted(p.relative_to(tmp_path / "images") for p in (tmp_path / "images").rglob("*.png"))
    assert read == [ordered[0].name] + [p.name for p in ordered[4:8]]
    assert _files(tmp_path / "out") == whole


def test_cli_dataset_run_prints_the_summary(tmp_path, samples, capsys):
    np.save(tmp_path / "x.npy", samples)
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
            "--format", "npz", "--memory-budget", "64K", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"23 samples in 1 shards written to {tmp_path / 'o'} in ")
    assert "relative conservation delta: worst" in out


@pytest.mark.parametrize("argv_tail, expected", [
    (["--out", "r.npy"], "--out writes one batch's result; a dataset run writes shards into -o"),
    (["--memory-budget", "lots"], "--memory-budget must be a size like 512M or 2G; got 'lots'"),
])
def test_cli_dataset_refusals(argv_tail, expected, tmp_path, samples, capsys):
    np.save(tmp_path / "x.npy", samples)
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "o"),
            *argv_tail]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_a_folder_without_an_output_folder_is_refused(tmp_path, samples, capsys):
    _write_pngs(tmp_path / "images", samples[:2])
    assert main(["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(tmp_path / "images")]) == 2
    assert "is a dataset: give the folder for its outputs with -o OUTDIR" in capsys.readouterr().err


def test_ray_without_ray_names_the_extra(monkeypatch, tmp_path, samples, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    np.save(tmp_path / "x.npy", samples[:2])
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(tmp_path / "x.npy"), "-o",
            str(tmp_path / "o"), "--ray"]
    assert main(argv) == 2
    assert 'running on Ray needs ray: pip install "rulegraph-onnx[ray]"' in capsys.readouterr().err
