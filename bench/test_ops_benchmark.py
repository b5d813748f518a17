"""pytest-benchmark suites of the per-op cases (attention, cross encoder, encoder, fusion decoder).

Run: ``python -m pytest bench --benchmark-only`` (add ``--benchmark-json=FILE`` to keep them).
These time the same cases and providers as ``python -m bench``; the harness is the one that
interleaves providers, counts FLOPs and writes RESULTS.md.
"""
import pytest
import torch

from bench.cases import build_cases

OP_GROUPS = ("attention", "cross encoder", "encoder", "fusion decoder")
CASES = [case for case in build_cases(torch.device("cpu"), torch.float32, ["eager", "compile", "sdpa", "released"])
         if case.group in OP_GROUPS and case.quick]


@pytest.mark.parametrize("case,provider", [(case, provider) for case in CASES for provider in case.providers],
                         ids=[f"{case.name}-{provider}" for case in CASES for provider in case.providers])
def test_op(benchmark, case, provider):
    inputs = case.make_inputs(0)
    fn = case.providers[provider]
    fn(*inputs)  # warm-up (and compilation) outside the timed rounds
    benchmark.extra_info.update(flops=case.flops, min_bytes=case.min_bytes)
    benchmark.pedantic(fn, args=inputs, rounds=5, warmup_rounds=1)
