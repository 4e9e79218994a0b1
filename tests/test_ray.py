"""Ray Data (rulegraph/ray.py): a dataset mapped through the explainer on a local Ray instance of 2
CPUs gives, row by row, what the local dataset run (run/shards.py) gives; ``explain --ray`` writes
the local run's files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rulegraph import Explainer
from rulegraph.cli import main
from rulegraph.run.shards import read_outputs

ray = pytest.importorskip("ray", reason="the Ray Data tests need the [ray] extra (ray[data])")
pytest.importorskip("pyarrow", reason="the Ray Data tests need the [ray] extra (pyarrow)")

import rulegraph.ray as on_ray  # noqa: E402  (after the skip: it needs nothing, its functions need ray)

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def samples():
    return np.random.default_rng(11).random((17, 1, 8, 8), dtype=np.float32)


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.round(array[0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor_rows(samples, tmp):
    np.save(tmp / "x.npy", samples)
    rows = [{"id": f"x.npy:{i}", "input": s} for i, s in enumerate(samples)]
    return ray.data.from_items(rows), tmp / "x.npy", None


def _image_rows(samples, tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"img{i}" for i in range(len(samples))], "image": [_png(s) for s in samples]}),
                   tmp / "t.parquet", row_group_size=5)
    return ray.data.read_parquet(str(tmp / "t.parquet")), tmp / "t.parquet", "image"


@pytest.mark.parametrize("make", [_tensor_rows, _image_rows])
def test_ray_rows_equal_the_local_run_row_by_row(make, local_ray, samples, tmp_path):
    dataset, local_input, column = make(samples, tmp_path)
    explainer = Explainer(CNN, "lrp-epsilon")
    explainer.explain_dataset(local_input, tmp_path / "local", format="npz", batch_size=4, progress=False,
                              max_amplification=None)
    local = read_outputs(tmp_path / "local")
    rows = on_ray.explain(dataset, CNN, "lrp-epsilon", column=column, batch_size=4, actors=2).take_all()
    by_id = {row["id"]: row for row in rows}
    assert sorted(by_id) == sorted(local["id"].tolist())
    for i, name in enumerate(local["id"]):
        row = by_id[name]
        assert sorted(row) == sorted(local)
        for key in local:
            if key != "id":
                np.testing.assert_array_equal(np.asarray(row[key]), local[key][i], err_msg=f"{name}: {key}")


def test_actor_pool_and_gpus_are_passed_to_map_batches(monkeypatch, samples):
    """What ``explain`` asks of Ray: ``map_batches`` of the callable class on an actor pool of the
    given size, ``num_gpus`` per actor, numpy batches of ``batch_size``."""
    seen = {}

    class Dataset:
        def map_batches(self, fn, **kwargs):
            seen.update(kwargs, fn=fn)
            return "mapped"

    mapped = on_ray.explain(Dataset(), CNN, "gradient", batch_size=8, actors=3, num_gpus=0.5, num_cpus=1)
    assert mapped == "mapped"
    assert seen["fn"] is on_ray.ExplainBatch
    # the actors open the model file: its path travels, not its bytes
    assert seen["fn_constructor_kwargs"]["model"] == str(CNN.resolve())
    assert (seen["batch_size"], seen["num_gpus"], seen["num_cpus"], seen["batch_format"]) == (8, 0.5, 1, "numpy")
    assert isinstance(seen["compute"], ray.data.ActorPoolStrategy)
    assert (seen["compute"].min_size, seen["compute"].max_size) == (3, 3)


def test_actors_leave_a_cpu_for_reading(local_ray):
    """2 CPUs, 2 actors: half a CPU each, so the read tasks get the other one."""
    assert [on_ray._cpus_per_actor(ray, n) for n in (1, 2, 4, 20)] == [1.0, 0.5, 0.25, 0.1]


def test_cli_ray_writes_the_local_run_files(local_ray, samples, tmp_path, capsys):
    for i, sample in enumerate(samples):
        folder = tmp_path / "images" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(_png(sample))
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(tmp_path / "images"), "--format",
            "npz", "--shard-size", "6", "--batch-size", "3", "--quiet", "--max-amplification", "1e9"]
    assert main([*argv, "-o", str(tmp_path / "local")]) == 0
    assert main([*argv, "--ray", "--actors", "2", "-o", str(tmp_path / "ray")]) == 0, capsys.readouterr().err
    assert "17 samples in 3 shards written to" in capsys.readouterr().out
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").iterdir())}
    remote = {p.name: p.read_bytes() for p in sorted((tmp_path / "ray").iterdir())}
    assert remote == local


@pytest.mark.parametrize("source", ["images", "parquet"])
@pytest.mark.parametrize("missing", [[1, 2], [0, 2], [2], [0, 1, 2]], ids=["tail", "holes", "last", "all"])
def test_cli_ray_resumes_the_missing_shards(source, missing, local_ray, samples, tmp_path, capsys):
    """A rerun of ``explain --ray`` into a folder with finished shards writes only the others, and
    the files equal an uninterrupted local run's byte for byte."""
    if source == "images":
        given = tmp_path / "images"
        for i, sample in enumerate(samples):
            folder = given / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:02d}.png").write_bytes(_png(sample))
    else:
        _, given, _ = _image_rows(samples, tmp_path)
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(given), "--format", "npz",
            "--shard-size", "6", "--batch-size", "3", "--quiet", "--max-amplification", "1e9"]
    assert main([*argv, "-o", str(tmp_path / "local")]) == 0
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").iterdir())}
    (tmp_path / "ray").mkdir()
    for name, data in local.items():   # an interrupted run: the manifest and the finished shards
        if not any(name == f"part-{k:05d}.npz" for k in missing):
            (tmp_path / "ray" / name).write_bytes(data)
    capsys.readouterr()
    assert main([*argv, "--ray", "--actors", "2", "-o", str(tmp_path / "ray")]) == 0, capsys.readouterr().err
    finished = 3 - len(missing)
    said = "17 samples in 3 shards " + (f"({finished} found finished)" if finished else "written")
    assert said in capsys.readouterr().out
    remote = {p.name: p.read_bytes() for p in sorted((tmp_path / "ray").iterdir())}
    assert remote == local


def test_cli_ray_refuses_a_shard_of_other_samples(local_ray, samples, tmp_path, capsys):
    _, given, _ = _image_rows(samples, tmp_path)
    argv = ["explain", str(CNN), "--rules", "lrp-epsilon", "--input", str(given), "--format", "npz",
            "--shard-size", "6", "--batch-size", "3", "--quiet", "--max-amplification", "1e9",
            "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    (tmp_path / "out" / "part-00001.npz").replace(tmp_path / "out" / "part-00000.npz")
    capsys.readouterr()
    assert main([*argv, "--ray"]) == 2   # a RulegraphError: exit code 2
    err = capsys.readouterr().err
    assert "part-00000.npz holds other samples than the source gives now (from sample 0: 'img6' there, " \
           "'img0' now)" in err
