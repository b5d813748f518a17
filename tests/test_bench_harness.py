"""The benchmark harness's own logic: FLOP counting, the results file, the report. No timings asserted."""
import json

import pytest
import torch

from bench.__main__ import PROVIDERS, measure_case
from bench.cases import Case, build_cases
from bench.flops import attention_flops, conv2d_flops, count_forward, linear_flops
from bench.report import README_MARKERS, append_rows, read_rows, write_report
from bench.timing import Timer
from crossfuse_fast import CrossFuse
from crossfuse_fast.reference.transformer import SelfAttention


def test_conv_and_linear_flops_by_hand():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    out = conv(torch.zeros(2, 3, 5, 7))
    assert conv2d_flops(conv, out) == 2 * (3 * 3 * 3 * 8 * 5 * 7 * 2) + 8 * 5 * 7 * 2
    grouped = torch.nn.Conv2d(4, 4, 3, groups=4, bias=False)
    assert conv2d_flops(grouped, grouped(torch.zeros(1, 4, 6, 6))) == 2 * 1 * 9 * 4 * 4 * 4
    linear = torch.nn.Linear(5, 3)
    assert linear_flops(linear, linear(torch.zeros(2, 4, 5))) == 2 * 5 * 3 * 8 + 3 * 8


def test_attention_layer_count_by_hand():
    layer = SelfAttention(64, 4)
    x = torch.zeros(3, 10, 64)
    count = count_forward(layer, lambda: layer(x))
    qkv = 2 * 64 * 192 * 30 + 192 * 30
    proj = 2 * 64 * 64 * 30 + 64 * 30
    scores = attention_flops(3, 4, 10, 16)
    assert scores == 4 * 3 * 4 * 10 * 10 * 16
    assert count.by_layer == {"qkv": qkv, "proj": proj, ".scores": scores}
    assert count.total == qkv + proj + scores


def test_counts_agree_with_spec_section_4():
    model = CrossFuse().to("meta").eval()
    image = torch.empty(1, 1, 480, 640, device="meta")
    count = count_forward(model, lambda: model(image, image))
    encoders = sum(v for k, v in count.by_layer.items() if "fea_encoder1" in k)
    attention = sum(v for k, v in count.by_layer.items() if k.startswith("fusion.cross_atten_block"))
    box = sum(v for k, v in count.by_layer.items() if ".weight.conv_" in k)
    decoder = sum(v for k, v in count.by_layer.items() if k.startswith("fusion.decoder_fusion")) - box
    assert encoders / 1e9 == pytest.approx(184, rel=0.01)
    assert attention / 1e9 == pytest.approx(62, rel=0.02)
    assert decoder / 1e9 == pytest.approx(11, rel=0.05)
    assert 11e9 < box < 15e9


def test_results_file_round_trip_and_bad_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_rows(path, [{"kind": "run", "run_id": "a"}])
    append_rows(path, [{"kind": "result", "run_id": "a", "median_s": 0.5}])
    assert read_rows(path) == [{"kind": "run", "run_id": "a"}, {"kind": "result", "run_id": "a", "median_s": 0.5}]
    with open(path, "a") as handle:
        handle.write("{broken\n")
    with pytest.raises(ValueError, match="results.jsonl:3: not a JSON line"):
        read_rows(path)


def _run(run_id, date, machine="Test CPU x2"):
    return {"kind": "run", "run_id": run_id, "date": date, "machine": machine, "device": "cpu", "cpu": "Test CPU",
            "cores": 2, "torch": "2.13", "triton": "3.9", "commit": "abc1234", "command": "python -m bench",
            "mode": "quick", "ceilings": {"matmul_float32_flops": 100e9, "copy_bytes_per_s": 10e9}}


def _result(run_id, provider, median, case="fuse 256x256 b1"):
    return {"kind": "result", "run_id": run_id, "case": case, "group": "fuse end to end",
            "provider": provider, "dtype": "float32", "median_s": median, "p10_s": median * 0.9,
            "p90_s": median * 1.1, "samples": 3, "inner": 1, "first_call_s": median, "flops": 20e9,
            "min_bytes": 1e9, "peak_memory_bytes": 2 ** 30}


def test_report_tables_ratios_floors_and_plot(tmp_path):
    results = tmp_path / "results.jsonl"
    append_rows(results, [_run("old", "2026-01-01T00:00:00+00:00"), _result("old", "eager", 9.0),
                          _run("new", "2026-02-01T00:00:00+00:00"), _result("new", "eager", 0.4),
                          _result("new", "compile", 0.25), _run("empty", "2026-03-01T00:00:00+00:00")])
    report = tmp_path / "RESULTS.md"
    write_report(results, report)
    text = report.read_text()
    assert text.index("2026-02-01") < text.index("2026-01-01")  # newest run first
    assert "2026-03-01" not in text  # a run without results is left out
    # 20 GFLOP in 0.25 s = 80 GFLOP/s = 80% of 100 GFLOP/s; the floor is 0.2 s (FLOPs) vs 0.1 s (bytes).
    assert "| fuse 256x256 b1 | compile | float32 | 250.00 ms | 225.00 ms-275.00 ms | 1.60x | 20.00 | 80.0 | 80.0% " \
           "| 200.00 ms, 100.00 ms | 80.0% | 1024 MiB |" in text
    plots = list(tmp_path.glob("results-*.png"))
    assert [p.name for p in plots] == ["results-test-cpu-x2-cpu.png"]
    assert plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("![time per provider and case") == 1


def test_memory_rows_get_their_own_section(tmp_path):
    """``python -m bench.memory`` rows: a table per run, tiled rows compared with the untiled one;
    they are not timing results (no headline row, no plot)."""
    results = tmp_path / "results.jsonl"
    rows = [{"kind": "memory", "run_id": "m", "case": "fuse 2048x2048 b1", "tile": tile, "provider": "fast",
             "dtype": "float32", "peak_rss_bytes": peak * 2 ** 30, "baseline_rss_bytes": 2 ** 29, "seconds": 40.0}
            for tile, peak in ((0, 4.5), (1024, 1.5))]
    rows[1].update(max_difference_vs_untiled=1, pixels_differing_vs_untiled=3)
    append_rows(results, [*rows, {**_run("m", "2026-04-01T00:00:00+00:00"), "mode": "memory", "ceilings": {}}])
    report = tmp_path / "RESULTS.md"
    write_report(results, report)
    text = report.read_text()
    assert "## Peak memory" in text and "### Test CPU x2 (cpu), 2026-04-01T00:00:00+00:00" in text
    assert "| fuse 2048x2048 b1 | fast | none | 4.50 GiB | 0.50 GiB | 40.00 s | - |" in text
    assert "| fuse 2048x2048 b1 | fast | 1024 | 1.50 GiB | 0.50 GiB | 40.00 s | 3 pixels differ, by at most 1 |" in text
    assert not list(tmp_path.glob("results-*.png"))


def test_headline_is_regenerated_into_the_readme(tmp_path):
    """Per machine and case the headline takes the newest run that timed the fast path (a newer run
    of the reference alone does not replace it), every figure of a row from that run; the README's
    block between the markers is rewritten and the rest of the README kept."""
    results = tmp_path / "results.jsonl"
    append_rows(results, [_run("fast", "2026-01-01T00:00:00+00:00"), _result("fast", "eager", 0.6),
                          _result("fast", "fast-torch", 0.4), _run("newer", "2026-02-01T00:00:00+00:00"),
                          _result("newer", "eager", 0.5), _result("newer", "compile", 0.3),
                          _result("newer", "eager", 2.0, case="train stage 1 256x256 b2"),
                          _result("newer", "eager", 1.0, case="attention w6")])
    readme = tmp_path / "README.md"
    begin, end = README_MARKERS
    readme.write_text(f"# title\n\n{begin}\nstale table\n{end}\n\nrest\n")
    write_report(results, tmp_path / "RESULTS.md", plot=False, readme_path=readme)
    text = readme.read_text()
    assert text.startswith(f"# title\n\n{begin}\n| machine |") and text.endswith(f"{end}\n\nrest\n")
    assert "stale table" not in text and "attention w6" not in text
    assert ("| Test CPU x2 (cpu) | fuse 256x256 b1 | float32 | 600.00 ms | - | 400.00 ms | 1.50x | 2026-01-01, abc1234 |"
            in text)
    assert ("| Test CPU x2 (cpu) | train stage 1 256x256 b2 | float32 | 2.00 s | - | not measured | - | "
            "2026-02-01, abc1234 |" in text)
    assert text.index("fuse 256x256 b1") < text.index("train stage 1")
    assert "## Headline" in (tmp_path / "RESULTS.md").read_text()
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs one"):
        write_report(results, tmp_path / "RESULTS.md", plot=False, readme_path=readme)


def test_measure_case_interleaves_and_records_every_field():
    calls = []

    def provider(name):
        def fn(x):
            calls.append(name)
            return x * 2
        return fn

    case = Case(name="toy", group="toy", flops=10, min_bytes=8, make_inputs=lambda seed: (torch.ones(4),),
                providers={"eager": provider("eager"), "other": provider("other")})
    rows = measure_case(case, Timer(torch.device("cpu")), repeats=3, min_sample_s=0.0, input_sets=1)
    assert [r["provider"] for r in rows] == ["eager", "other"]
    for row in rows:
        assert row["samples"] == 3 and row["inner"] == 1
        assert row["p10_s"] <= row["median_s"] <= row["p90_s"]
        assert json.loads(json.dumps(row)) == row
    # warm-up and first sample per provider, then the remaining samples alternate between providers
    assert calls[4:] == ["eager", "other", "other", "eager"]


def test_every_case_builds_on_a_cpu_with_its_providers():
    """Building the cases runs no timing, but catches a case that fails to build (the GPU
    sessions that run the rest are short; a broken case must not cost one)."""
    cases = build_cases(torch.device("cpu"), torch.float32, list(PROVIDERS))
    names = [case.name for case in cases]
    assert len(names) == len(set(names))
    assert all(case.providers and case.flops > 0 and case.min_bytes > 0 for case in cases)
    cpu_providers = {provider for case in cases for provider in case.providers}
    assert cpu_providers == {"eager", "compile", "released", "api", "sdpa", "fast-torch", "fast-torch-nchw"}
    for stage in ("train stage 1", "train stage 2"):
        training = next(case for case in cases if case.name.startswith(stage))
        assert {"fast-torch", "fast-torch-nchw"} <= set(training.providers), stage
