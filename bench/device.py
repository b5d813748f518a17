"""The prepared GPU run: the GPU-only tests, then the benchmark cases only a GPU answers, in one command.

A GPU is lent here rarely and for minutes, so what it should answer is decided beforehand and
spent in one call (the device tool's ``run``, from the repository root)::

    PYTHONPATH=. python -m bench.device --out $OUT --commit <sha>      # on the GPU machine
    python -m bench.device --append <folder it came back in>           # here: into bench/results.jsonl
    python -m bench.device --dry-run --out /tmp/dry                    # here, on a CPU: the same steps, tiny

Steps, in this order, each with its own time limit so that one that overruns costs only itself:
the kernel and fast-path tests on real compiled kernels (16-bit parity, ``torch.compile`` on CUDA,
the precisions' error bounds, real CUDA graphs; the sm_90 compile inspector is left to CI, which
runs it on every commit); the fast path end to end at batch 1 and 32 (``fuse`` itself, CUDA graphs
on repeated shapes, in each precision), the encoder and the fusion decoder, against the reference
eager and under ``torch.compile``; both training steps; bf16 throughout; the attention and the
cross encoder where launches dominate. The whole stays within ``--budget`` seconds (a step is skipped when less than
its limit is left). Into ``--out`` go five files (the device tool brings back eight at most):
``device.log`` (every step's output), ``results.jsonl`` (the harness's rows), ``RESULTS.md`` (their
report), its plot, and ``summary.json`` (each step's status and seconds).
``--dry-run`` runs the same steps on the CPU with Triton's interpreter, at the harness's smallest
case, so a broken script is found before a GPU is spent on it (tested in the suite).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .report import append_rows, read_rows, write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.jsonl"


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    limit_s: int


def _bench(out: Path, cases: str, providers: str, dtype: str, device: str, mode: str, repeats: int) -> tuple[str, ...]:
    return ("-m", "bench", "--mode", mode, "--device", device, "--dtype", dtype, "--cases", cases,
            "--providers", providers, "--repeats", str(repeats), "--results", str(out / "results.jsonl"),
            "--report", str(out / "RESULTS.md"))


def steps(out: Path, dry_run: bool) -> list[Step]:
    """What the run does, in order: on a GPU (``dry_run=False``) or its CPU rehearsal."""
    if dry_run:
        tiny = dict(cases="^attention w6$", providers="eager,sdpa", dtype="float32", device="cpu", mode="quick",
                    repeats=1)
        return [Step("tests", ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "tests/kernels/test_registry.py"), 120),
                Step("inference fp32", _bench(out, **tiny), 60),
                Step("training fp32", _bench(out, **tiny), 60)]
    inference = "^(fuse 480x640 b(1|32)|encoder 480x640 b1|fusion decoder 480x640 b1)$"
    return [
        Step("tests", ("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/kernels", "tests/fast",
                       "--ignore=tests/kernels/test_compile_inspector.py", "--ignore=tests/fast/test_compile.py"),
             150),
        Step("gpu features", ("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_precision.py",
                              "tests/test_cuda_graphs.py", "tests/fast/test_compile.py"), 80),
        Step("inference fp32", _bench(out, inference, "eager,compile,fast-triton,api,api-tf32,api-bf16,api-fp16",
                                      "float32", "cuda", "full", 10), 170),
        Step("training fp32", _bench(out, "^train stage (1|2) ", "eager,fast-triton,fast-torch-nhwc", "float32",
                                     "cuda", "full", 10), 60),
        Step("inference bf16", _bench(out, "^fuse 480x640 b1$", "eager,compile,fast-triton", "bfloat16", "cuda",
                                      "full", 10), 40),
        Step("launch-bound", _bench(out, "^(attention|cross encoder) w(6|48)$", "eager,sdpa,triton,fast-triton",
                                    "float32,bfloat16", "cuda", "full", 10), 40),
    ]


def run(out: Path, dry_run: bool, budget_s: float, commit: str) -> dict:
    """Run every step that fits in the budget; return the summary (also written to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "BENCH_COMMIT": commit}
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    begin = time.monotonic()
    summary: dict = {"dry_run": dry_run, "commit": commit, "budget_s": budget_s, "steps": []}
    with open(out / "device.log", "w", encoding="utf-8") as log:
        for step in steps(out, dry_run):
            left = budget_s - (time.monotonic() - begin)
            record = {**asdict(step), "argv": list(step.argv)}
            if left < step.limit_s:
                summary["steps"].append({**record, "status": "skipped: over budget"})
                continue
            log.write(f"==== {step.name}: python {' '.join(step.argv)}\n")
            log.flush()
            started = time.monotonic()
            try:
                result = subprocess.run([sys.executable, *step.argv], cwd=ROOT, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, timeout=step.limit_s)
                status = "passed" if result.returncode == 0 else f"failed ({result.returncode})"
            except subprocess.TimeoutExpired:
                status = "timed out"
            log.write(f"==== {step.name}: {status} in {time.monotonic() - started:.1f} s\n")
            log.flush()
            summary["steps"].append({**record, "status": status, "seconds": round(time.monotonic() - started, 1)})
    summary["seconds"] = round(time.monotonic() - begin, 1)
    if (out / "results.jsonl").exists():
        write_report(out / "results.jsonl", out / "RESULTS.md", plot=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def append(folder: Path, results: Path = RESULTS) -> int:
    """Append a device run's rows to ``results`` (rows of runs already there are left out); return how
    many were appended. The caller regenerates the report (``python -m bench --report-only``)."""
    known = {row.get("run_id") for row in read_rows(results)}
    rows = [row for row in read_rows(folder / "results.jsonl") if row.get("run_id") not in known]
    append_rows(results, rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the run's files")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on a CPU, tiny (Triton's interpreter)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds the steps may take in all (540)")
    parser.add_argument("--commit", default="unknown", help="the commit the tree is at (the GPU machine has no .git)")
    parser.add_argument("--append", type=Path, metavar="FOLDER",
                        help="append a run's results.jsonl from FOLDER to bench/results.jsonl and regenerate the report")
    args = parser.parse_args(argv)
    if args.append:
        count = append(args.append)
        write_report(RESULTS, ROOT / "bench" / "RESULTS.md", readme_path=ROOT / "README.md")
        print(f"appended {count} rows to {RESULTS}; regenerated bench/RESULTS.md and the README's headline")
        return 0
    if args.out is None:
        parser.error("--out is required (or --append)")
    summary = run(args.out, args.dry_run, args.budget, args.commit)
    for step in summary["steps"]:
        print(f"{step['name']:16} {step['status']:22} {step.get('seconds', '-')} s")
    return 0 if all(step["status"] == "passed" for step in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
