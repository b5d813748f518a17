"""``python -m bench.device``: the prepared GPU run, rehearsed on the CPU so that a broken script is
found here, not on the few minutes of a lent GPU."""
import json
import subprocess
import sys
from pathlib import Path

from bench.device import append, steps
from bench.report import read_rows

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_step_and_writes_what_comes_back(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.device", "--dry-run", "--out", str(out), "--commit", "abc1234"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = sorted(path.name for path in out.iterdir())
    assert {"RESULTS.md", "device.log", "results.jsonl", "summary.json"} <= set(names) and len(names) <= 8
    summary = json.loads((out / "summary.json").read_text())
    assert [step["status"] for step in summary["steps"]] == ["passed"] * len(steps(out, dry_run=True))
    rows = read_rows(out / "results.jsonl")
    assert {row["kind"] for row in rows} == {"run", "result"}
    assert "attention w6" in (out / "RESULTS.md").read_text()
    log = (out / "device.log").read_text()
    assert all(f"==== {step.name}: passed" in log for step in steps(out, dry_run=True))

    results = tmp_path / "results.jsonl"
    assert append(out, results) == len(rows)
    assert append(out, results) == 0  # a run already appended is not appended again
    assert read_rows(results) == rows


def test_the_gpu_plan_puts_tests_first_and_fits_a_device_call(tmp_path):
    """The GPU run's order and limits: the tests first, then the GPU features' tests, every step
    inside one device call (600 s) and the default budget (540 s)."""
    plan = steps(tmp_path, dry_run=False)
    assert [step.name for step in plan[:2]] == ["tests", "gpu features"]
    assert all(step.argv[:2] == ("-m", "pytest") for step in plan[:2])
    assert all(step.argv[:2] == ("-m", "bench") and "--device" in step.argv and
               step.argv[step.argv.index("--device") + 1] == "cuda" for step in plan[2:])
    assert sum(step.limit_s for step in plan[:3]) <= 480 and sum(step.limit_s for step in plan) <= 540 < 600
