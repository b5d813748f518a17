"""``python -m bench``: time every provider on every case, append the results, regenerate the report.

Examples::

    python -m bench --mode quick                 # a few cases, under 5 minutes on 2 CPU cores
    python -m bench --mode full                  # every case
    python -m bench --device cuda --dtype float32,bfloat16
    python -m bench --report-only                # rebuild RESULTS.md, its plots and the README's headline
"""
from __future__ import annotations

import argparse
import datetime
import re
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import torch

from .cases import build_cases
from .machine import describe, measure_ceilings
from .report import append_rows, write_report
from .timing import Timer, peak_memory

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
PROVIDERS = ("eager", "compile", "compile-graphs", "released", "api", "sdpa", "fast-torch", "fast-torch-nchw",
             "fast-torch-nhwc", "fast-triton", "fast-triton-graphs", "triton")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure_case(case, timer: Timer, repeats: int, min_sample_s: float, input_sets: int) -> list[dict]:
    """Warm up and calibrate each provider, then take ``repeats`` samples of each, interleaved."""
    inputs = [case.make_inputs(seed) for seed in range(input_sets)]
    state = {}
    for name, fn in case.providers.items():
        try:
            begin = time.perf_counter()
            fn(*inputs[0])
            timer.sync()
            first_call_s = time.perf_counter() - begin
            samples: list[float] = []
            memory = peak_memory(timer.device, lambda: samples.append(timer.sample(lambda: fn(*inputs[0]))))
            inner = max(1, min(1000, int(min_sample_s / max(samples[0], 1e-9)) + 1))
            if inner > 1:
                samples.clear()
            state[name] = {"fn": fn, "samples": samples, "inner": inner, "first": first_call_s, "memory": memory}
        except Exception as error:  # one failing provider must not lose the others' numbers
            print(f"  {case.name}: {name} failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}",
                  file=sys.stderr)
    names = list(state)
    for repeat in range(repeats if names else 0):
        # Rotate the order each round so no provider always runs right after another.
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            entry = state[name]
            if len(entry["samples"]) >= repeats:
                continue
            data = inputs[repeat % len(inputs)]
            entry["samples"].append(timer.sample(lambda: entry["fn"](*data), entry["inner"]))
    rows = []
    for name, entry in state.items():
        samples = entry["samples"]
        rows.append({"case": case.name, "group": case.group, "provider": name,
                     "median_s": statistics.median(samples), "p10_s": _quantile(samples, 0.1),
                     "p90_s": _quantile(samples, 0.9), "samples": len(samples), "inner": entry["inner"],
                     "first_call_s": entry["first"], "flops": case.flops, "min_bytes": case.min_bytes,
                     "peak_memory_bytes": entry["memory"], "notes": case.notes})
    return rows


def _raise_recompile_limit() -> None:
    """Every case compiles its own static shapes; the default limit of 8 would fall back to eager."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated from {PROVIDERS}")
    parser.add_argument("--cases", default="", help="regular expression on case names")
    parser.add_argument("--repeats", type=int, help="samples per provider (default: 3 on a CPU, 20 on a GPU)")
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--report", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--readme", type=Path, help="whose headline table to regenerate (default: the "
                        "repository's README, when the results are bench/results.jsonl)")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the report")
    args = parser.parse_args(argv)
    if args.readme is None and args.results.resolve() == (HERE / "results.jsonl").resolve():
        args.readme = README
    if args.report_only:
        write_report(args.results, args.report, readme_path=args.readme)
        return 0

    device = torch.device(args.device)
    providers = [p for p in args.providers.split(",") if p]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"unknown providers {unknown}; choose from {PROVIDERS}")
    quick = args.mode == "quick"
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    min_sample_s = 0.02 if device.type == "cuda" else 0.2
    input_sets = 4 if device.type == "cuda" else 1  # rotate inputs so a GPU's L2 does not hold them all
    _raise_recompile_limit()

    timer = Timer(device)
    info = describe(device)
    print(f"{info['machine']} ({device.type}), torch {info['torch']}, triton {info['triton']}, commit {info['commit']}")
    ceilings = measure_ceilings(device, quick)
    print("ceilings: " + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in ceilings.items()))
    run_id = uuid.uuid4().hex[:12]
    run = {"kind": "run", "run_id": run_id, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
           "mode": args.mode, **info}
    pattern = re.compile(args.cases)
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        for case in build_cases(device, dtype, providers):
            if (quick and not case.quick) or not pattern.search(case.name) or not case.providers:
                continue
            torch._dynamo.reset()
            rows = measure_case(case, timer, repeats, min_sample_s, input_sets)
            for row in rows:
                row.update(kind="result", run_id=run_id, dtype=dtype_name)
            append_rows(args.results, rows)
            eager = next((r["median_s"] for r in rows if r["provider"] == "eager"), None)
            print(f"{case.name} [{dtype_name}]: " + ", ".join(
                f"{r['provider']} {r['median_s'] * 1e3:.2f} ms"
                + (f" ({eager / r['median_s']:.2f}x)" if eager else "") for r in rows), flush=True)
    # Ceilings again at the end, keeping the better reading of each: the cases ran in between.
    ceilings = {name: max(value, ceilings[name]) for name, value in measure_ceilings(device, quick).items()}
    append_rows(args.results, [{**run, "ceilings": ceilings}])
    write_report(args.results, args.report, readme_path=args.readme)
    print(f"appended to {args.results}; wrote {args.report}" + (f" and the headline in {args.readme}" if args.readme
                                                                 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
