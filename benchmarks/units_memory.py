"""Peak memory of ``rulegraph units`` (dataset examples per unit) against the dataset's size.

For each size N (default 1,000 and 10,000) writes N seeded 8x8 grey PNGs into a folder (as
``dataset_memory.py`` does) and runs ``rulegraph units models/digits_cnn.onnx --layer L --input FOLDER
-k 9 -o grid.png --json examples.json`` in its own process, printing the child's peak resident set
size (``ru_maxrss``) and the time. The running top k per unit is merged batch by batch, so the peak
should not grow with N.

    python benchmarks/units_memory.py [--sizes 1000,10000] [--layer TENSOR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_memory import MEASURE, MODEL, write_images  # noqa: E402

LAYER = "/features/features.6/Relu_output_0"


def command(folder: Path, work: Path, layer: str) -> list[str]:
    return [sys.executable, "-m", "rulegraph.cli", "units", str(MODEL), "--layer", layer, "--input",
            str(folder), "-k", "9", "-o", str(work / "grid.png"), "--json", str(work / "examples.json"),
            "--quiet"]


def peak(folder: Path, work: Path, layer: str) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, *command(folder, work, layer)], capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout)
    assert result["code"] == 0, done.stderr
    return result["rss_kb"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--layer", default=LAYER)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("| images | peak RSS (MiB) | time (s) |\n|---|---|---|")
        for count in (int(s) for s in args.sizes.split(",")):
            folder = work / f"images{count}"
            write_images(folder, count)
            rss, seconds = peak(folder, work, args.layer)
            print(f"| {count:,} | {rss / 1024:.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
