"""The results file (JSON lines) and the report generated from it (RESULTS.md and plots).

Each run appends one ``{"kind": "result", ...}`` row per case and provider as it goes and, at
its end, one ``{"kind": "run", ...}`` row (machine, versions, commit, date, command, measured
ceilings), tied by ``run_id``; results of a run that did not finish have no run row and are
left out of the report. The report groups rows by run, newest first, so every ratio in a table compares
providers measured in the same run.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from .flops import breakdown_table

RESULT_FIELDS = ("run_id", "case", "group", "provider", "dtype", "median_s", "p10_s", "p90_s", "samples",
                 "inner", "first_call_s", "flops", "min_bytes", "peak_memory_bytes")
RUN_FIELDS = ("run_id", "date", "machine", "device", "cpu", "cores", "torch", "triton", "commit", "command",
              "mode", "ceilings")


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from error
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


CONVOLUTION_GROUPS = ("fuse end to end", "encoder", "fusion decoder", "training")


def _peak_dtype(run: dict, dtype: str, group: str) -> str:
    """The matmul peak a row is read against. On a GPU whose convolutions run in TF32
    (PyTorch's default), float32 cases made mostly of convolutions are read against the TF32
    peak; the transformer cases' float32 matrix products run in full fp32."""
    if (dtype == "float32" and group in CONVOLUTION_GROUPS and run.get("cudnn_tf32")
            and "matmul_tf32_flops" in run.get("ceilings", {})):
        return "tf32"
    return dtype


def run_table(run: dict, results: list[dict]) -> list[str]:
    """Markdown lines: one row per case and provider, with the ratio to ``eager`` of the same run."""
    ceilings = run.get("ceilings", {})
    bandwidth = ceilings.get("copy_bytes_per_s")
    eager = {(r["case"], r["dtype"]): r["median_s"] for r in results if r["provider"] == "eager"}
    lines = ["| case | provider | dtype | median | p10-p90 | vs eager | GFLOP | GFLOP/s | % matmul peak "
             "| floor: FLOP, bytes | % of floor | peak mem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        median = r["median_s"]
        rate = r["flops"] / median
        peak = ceilings.get(f"matmul_{_peak_dtype(run, r['dtype'], r['group'])}_flops")
        floor_flops = r["flops"] / peak if peak else None
        floor_bytes = r["min_bytes"] / bandwidth if bandwidth else None
        floors = [f for f in (floor_flops, floor_bytes) if f]
        baseline = eager.get((r["case"], r["dtype"]))
        cells = [r["case"], r["provider"], r["dtype"], _seconds(median),
                 f"{_seconds(r['p10_s'])}-{_seconds(r['p90_s'])}",
                 f"{baseline / median:.2f}x" if baseline else "-",
                 f"{r['flops'] / 1e9:.2f}", f"{rate / 1e9:.1f}",
                 f"{100 * rate / peak:.1f}%" if peak else "-",
                 f"{_seconds(floor_flops) if floor_flops else '-'}, {_seconds(floor_bytes) if floor_bytes else '-'}",
                 f"{100 * max(floors) / median:.1f}%" if floors else "-",
                 f"{r['peak_memory_bytes'] / 2 ** 20:.0f} MiB"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_run(run: dict, results: list[dict], path: Path) -> None:
    """Horizontal bars of median time per case, one bar per provider, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] + (f" ({r['dtype']})" if r["dtype"] != "float32" else "") for r in results))
    providers = list(dict.fromkeys(r["provider"] for r in results))
    height = 0.8 / max(len(providers), 1)
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(cases) * max(1, len(providers) / 2) + 1.5))
    for index, provider in enumerate(providers):
        times = {r["case"] + (f" ({r['dtype']})" if r["dtype"] != "float32" else ""): r["median_s"]
                 for r in results if r["provider"] == provider}
        positions = [i + index * height for i, case in enumerate(cases) if case in times]
        axis.barh(positions, [times[case] for case in cases if case in times], height=height, label=provider)
    axis.set_yticks([i + height * (len(providers) - 1) / 2 for i in range(len(cases))], cases, fontsize=8)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("median time per call (s, log scale)")
    axis.set_title(f"{run['machine']} ({run['device']}), newest run of each case up to {run['date'][:10]}",
                   fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results_path: Path, report_path: Path, plot: bool = True) -> None:
    """Regenerate ``report_path`` (and one PNG per run beside it) from the results file."""
    rows = read_rows(results_path)
    runs = [r for r in rows if r.get("kind") == "run"]
    results = [r for r in rows if r.get("kind") == "result"]
    lines = ["# Benchmark results", "",
             f"Generated by `python -m bench` from `{results_path.name}` (one JSON line per measurement); "
             "do not edit by hand. Each section is one run: every provider of a case was measured in that "
             "run, interleaved, so the `vs eager` ratios compare like with like. `median` is per call; "
             "`floor` is the time the case's counted FLOPs would take at the run's measured matmul peak, "
             "and its minimum bytes at the measured copy bandwidth; `% of floor` is the larger floor over "
             "the median. FLOPs and bytes are counted as `bench/flops.py` says. `peak mem` is max allocated "
             "on a GPU, and RSS growth during one call on a CPU (a lower bound: the allocator reuses "
             "memory freed earlier).", ""]
    for run in sorted(runs, key=lambda r: r["date"], reverse=True):
        mine = [r for r in results if r["run_id"] == run["run_id"]]
        if not mine:
            continue
        ceilings = run.get("ceilings", {})
        ceiling_text = ", ".join(
            f"{name.removeprefix('matmul_').removesuffix('_flops')} matmul {value / 1e12:.2f} TFLOP/s"
            for name, value in ceilings.items() if name.startswith("matmul_"))
        if "copy_bytes_per_s" in ceilings:
            ceiling_text += f", copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)"
        lines += [f"## {run['machine']} ({run['device']}), {run['date']}", "",
                  f"- command: `{run['command']}` ({run['mode']} mode)",
                  f"- commit {run['commit']}, torch {run['torch']}, triton {run['triton']}, "
                  f"{run['cores']} cores, CPU {run['cpu']}",
                  f"- measured ceilings: {ceiling_text}"
                  + ("; float32 rows of the convolution-heavy cases (end to end, encoder, decoder, "
                     "training) are read against the TF32 peak, since cuDNN convolutions run in TF32 by "
                     "default; the transformer cases' float32 matrix products run in full fp32"
                     if _peak_dtype(run, "float32", "encoder") == "tf32" else ""),
                  ""]
        lines += run_table(run, mine)
        if plot and run is _latest_for(runs, results, run):
            image = report_path.parent / f"results-{_slug(run['machine'])}-{run['device']}.png"
            plot_run(run, _newest_per_measurement(runs, results, run), image)
            lines += ["", f"![time per provider and case, newest measurement of each on this machine]({image.name})"]
        lines.append("")
    lines += ["## How the FLOPs are counted", "",
              "One multiply-add is 2 FLOPs; convolutions, linear layers and the attention products "
              "are counted from the shapes the reference runs (hooks on the `meta` device), as "
              "`bench/flops.py` documents; a training step counts 3x the forward of the trained "
              "layers. One pair, by layer group:", ""]
    lines += breakdown_table()
    report_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _newest_per_measurement(runs: list[dict], results: list[dict], run: dict) -> list[dict]:
    """For a machine's plot: the newest row of each (case, provider, dtype) over its runs."""
    dates = {r["run_id"]: r["date"] for r in runs if r["machine"] == run["machine"] and r["device"] == run["device"]}
    newest: dict[tuple, dict] = {}
    for row in sorted((r for r in results if r["run_id"] in dates), key=lambda r: dates[r["run_id"]]):
        newest[(row["case"], row["provider"], row["dtype"])] = row
    return list(newest.values())


def _latest_for(runs: list[dict], results: list[dict], run: dict) -> dict:
    """The newest run with results on the same machine and device (the one its plot shows)."""
    same = [r for r in runs if r["machine"] == run["machine"] and r["device"] == run["device"]
            and any(x["run_id"] == r["run_id"] for x in results)]
    return max(same, key=lambda r: r["date"])
