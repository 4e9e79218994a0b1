"""Peak memory of a dataset run against the dataset's size, and an interrupted run resumed.

For each size N (default 1,000 and 10,000) writes N seeded 8x8 grey PNGs into a folder and runs
``rulegraph explain models/digits_cnn.onnx --rules lrp-epsilon --input FOLDER -o OUT`` in its own
process, printing the child's peak resident set size (``ru_maxrss``) and the time. With
``--resume N`` it also runs N images once whole and once interrupted by SIGINT half-way then
resumed, and says whether the two output folders are byte-identical.

    python benchmarks/dataset_memory.py                 # 1,000 vs 10,000
    python benchmarks/dataset_memory.py --resume 5000   # and the interrupt/resume check
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
#: runs the CLI in a child and prints its peak RSS (kB on Linux) and exit code as JSON
MEASURE = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "code": code}))
"""


def write_images(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(sub / f"{i:06d}.png")


def command(folder: Path, out: Path, fmt: str) -> list[str]:
    return [sys.executable, "-m", "rulegraph.cli", "explain", str(MODEL), "--rules", "lrp-epsilon", "--input",
            str(folder), "-o", str(out), "--format", fmt, "--quiet", "--max-amplification", "1e9"]


def peak(folder: Path, out: Path, fmt: str) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, *command(folder, out, fmt)], capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout)
    assert result["code"] == 0, done.stderr
    return result["rss_kb"], time.perf_counter() - started


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def resume_check(work: Path, count: int, fmt: str) -> None:
    folder = work / f"resume{count}"
    write_images(folder, count)
    subprocess.run(command(folder, work / "whole", fmt), check=True, stdout=subprocess.DEVNULL)
    process = subprocess.Popen(command(folder, work / "cut", fmt), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = -(-count // 1000)
    while process.poll() is None and len(list((work / "cut").glob("part-*"))) < shards // 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code = process.wait()
    kept = len(list((work / "cut").glob("part-*")))
    subprocess.run(command(folder, work / "cut", fmt), check=True, stdout=subprocess.DEVNULL)
    same = files(work / "cut") == files(work / "whole")
    print(f"resume, {count} images: interrupted with exit code {code} after {kept} of {shards} shards; "
          f"resumed output byte-identical to the uninterrupted run: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--format", default="parquet", choices=["parquet", "npz"])
    parser.add_argument("--resume", type=int, help="also interrupt and resume a run of this many images")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("| images | peak RSS (MiB) | time (s) |\n|---|---|---|")
        for count in (int(s) for s in args.sizes.split(",")):
            folder = work / f"images{count}"
            write_images(folder, count)
            rss, seconds = peak(folder, work / f"out{count}", args.format)
            print(f"| {count:,} | {rss / 1024:.1f} | {seconds:.1f} |")
        if args.resume:
            resume_check(work, args.resume, args.format)


if __name__ == "__main__":
    main()
