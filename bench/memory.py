"""Peak memory of ``fuse()`` by image size and tile, each case in a fresh process.

    python -m bench.memory                                  # the default cases, appended to results.jsonl
    python -m bench.memory --cases 480x640:1024,2048x2048:0 --backend reference

A case is ``HEIGHTxWIDTH:TILE`` (``TILE`` 0: untiled). A synthetic pair of that size is written
as PNGs; the case's process loads a model with random weights (memory does not depend on their
values), reads the pair, and fuses it once with ``fuse(..., tile=TILE)`` on the CPU; it reports the process's peak resident
memory (``VmHWM``), the same before the call (Python, torch and the model), and the call's time.
Where a size is run both tiled and untiled, the tiled result is compared with the untiled one
(uint8 grey levels). Rows go to ``results.jsonl`` as ``{"kind": "memory"}`` with a run row, and
``python -m bench --report-only`` renders them in RESULTS.md. Linux only (``/proc``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
DEFAULT_CASES = "480x640:1024,2048x2048:0,2048x2048:1024,4096x4096:1024"


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_one(pair: Path, tile: int, backend: str, out: Path) -> dict:
    """In this process: fuse the pair ``pair``-ir.png / ``pair``-vis.png, save the result to ``out``
    (.npy), return the figures."""
    import cv2
    import torch

    from crossfuse_fast import CrossFuse, fuse
    from crossfuse_fast.synthetic import randomize_batch_norms

    torch.manual_seed(0)
    model = randomize_batch_norms(CrossFuse()).eval()
    ir, vis = (cv2.imread(f"{pair}-{name}.png", cv2.IMREAD_UNCHANGED) for name in ("ir", "vis"))
    before = _peak_rss_bytes()
    start = time.perf_counter()
    fused = fuse(ir, vis, model=model, backend=backend, tile=tile or None)
    seconds = time.perf_counter() - start
    np.save(out, fused)
    return {"peak_rss_bytes": _peak_rss_bytes(), "baseline_rss_bytes": before, "seconds": seconds}


def _parse_case(text: str) -> tuple[int, int, int]:
    size, _, tile = text.partition(":")
    height, _, width = size.partition("x")
    return int(height), int(width), int(tile or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated HEIGHTxWIDTH:TILE (TILE 0: untiled)")
    parser.add_argument("--backend", default="fast", choices=("fast", "reference"))
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.tile, args.backend, args.save)))
        return 0

    import cv2
    import torch

    from crossfuse_fast.synthetic import synthetic_pair

    from .machine import describe
    from .report import append_rows

    run_id = uuid.uuid4().hex[:12]
    command = "python -m bench.memory" + "".join(f" {a}" for a in map(shlex.quote, argv or sys.argv[1:]))
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for text in args.cases.split(","):
            height, width, tile = _parse_case(text)
            pair, saved = Path(scratch) / f"{height}x{width}", Path(scratch) / f"{height}x{width}-{tile}.npy"
            if not Path(f"{pair}-ir.png").exists():
                for name, image in zip(("ir", "vis"), synthetic_pair(height, width, seed=0)):
                    cv2.imwrite(f"{pair}-{name}.png", image)
            done = subprocess.run([sys.executable, "-m", "bench.memory", "--one", str(pair), "--tile", str(tile),
                                   "--backend", args.backend, "--save", str(saved)],
                                  capture_output=True, text=True, cwd=HERE.parent)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            outputs[(height, width, tile)] = np.load(saved)
            row = {"kind": "memory", "run_id": run_id, "case": f"fuse {height}x{width} b1", "tile": tile,
                   "provider": args.backend, "dtype": "float32", **figures}
            untiled = outputs.get((height, width, 0))
            if tile and untiled is not None:
                difference = np.abs(outputs[(height, width, tile)].astype(int) - untiled.astype(int))
                row["max_difference_vs_untiled"] = int(difference.max())
                row["pixels_differing_vs_untiled"] = int(np.count_nonzero(difference))
            rows.append(row)
            print(f"{row['case']} tile {tile or 'none'}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB "
                  f"(before the call {row['baseline_rss_bytes'] / 2**30:.2f} GiB), {row['seconds']:.1f} s", flush=True)
    run = {"kind": "run", "run_id": run_id, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command, "mode": "memory", "ceilings": {}, **describe(torch.device("cpu"))}
    append_rows(args.results, [*rows, run])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
