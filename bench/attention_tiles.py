"""Sweep the attention kernels' tiles on a GPU, against SDPA on negated queries.

``python -m bench.attention_tiles`` prints, per (dtype, windows), the four fastest forward
tiles (``triton.testing.do_bench`` median) with their ratio to SDPA's forward, then the
backward tiles against SDPA's backward, to choose ``forward_tiles`` and ``backward_tiles``.
Not a results file: the harness (``python -m bench``) records the numbers that count.
``--backward-only`` / ``--forward-only`` halve the run; the backward sweep is 54 tiles per
case, so give it a long time limit. ``--registers`` needs no GPU: it compiles every tile of both
sweeps for sm_90 (:mod:`crossfuse_fast.kernels.compile_inspector`) and prints registers, spills
and shared memory, to narrow a sweep down to tiles that do not spill.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from crossfuse_fast.kernels.flash_attention import Tiles, attention_bwd, attention_fwd, default_scale

HEADS, TOKENS, HEAD_DIM = 16, 256, 32
FORWARD_TILES = [Tiles(*shape) for shape in itertools.product((32, 64, 128), (32, 64), (2, 4, 8), (1, 2, 3))]
BACKWARD_TILES = [Tiles(*shape) for shape in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))]
"""The tiles each sweep times (``--registers`` compiles the same ones)."""
WINDOWS = (6, 48, 384)
DTYPES = (torch.float32, torch.bfloat16)


def _time(fn) -> float | None:
    try:
        return triton.testing.do_bench(fn, return_mode="median")
    except Exception as error:  # a tile shape that does not fit the chip's shared memory
        print(f"    skipped: {type(error).__name__}")
        return None


def _report(label: str, baseline_ms: float, results: list[tuple[float, object]]) -> None:
    results.sort(key=lambda item: item[0])
    for ms, config in results[:4]:
        print(f"{label} {config}  {ms * 1e3:8.1f} us  sdpa {baseline_ms * 1e3:8.1f} us  {baseline_ms / ms:5.2f}x",
              flush=True)


def sweep_forward(dtype: torch.dtype, windows: int) -> None:
    q, k, v = (torch.randn(windows, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3))
    out = torch.empty_like(q)
    sdpa = _time(lambda: F.scaled_dot_product_attention(-q, k, v))
    results = []
    for tiles in FORWARD_TILES:
        ms = _time(lambda tiles=tiles: attention_fwd(q, k, v, out, reverse=True, scale=default_scale(HEAD_DIM),
                                                     tiles=tiles))
        if ms is not None:
            results.append((ms, tiles))
    _report(f"fwd {str(dtype)[6:]:9} w{windows:<4}", sdpa, results)


def sweep_backward(dtype: torch.dtype, windows: int) -> None:
    q, k, v = (torch.randn(windows, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)
    sdpa_out = F.scaled_dot_product_attention(-q, k, v)
    sdpa = _time(lambda: torch.autograd.grad(sdpa_out, (q, k, v), grad, retain_graph=True))
    q, k, v = q.detach(), k.detach(), v.detach()
    out = torch.empty_like(q)
    lse = attention_fwd(q, k, v, out, reverse=True, scale=default_scale(HEAD_DIM))
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    results = []
    for tiles in BACKWARD_TILES:
        ms = _time(lambda tiles=tiles: attention_bwd(grad, q, k, v, out, lse, dq, dk, dv, reverse=True,
                                                     scale=default_scale(HEAD_DIM), tiles=tiles))
        if ms is not None:
            results.append((ms, tiles))
    _report(f"bwd {str(dtype)[6:]:9} w{windows:<4}", sdpa, results)


def tile_resources(dtypes=DTYPES):
    """``(direction, tiles, resources)`` of the attention kernels compiled for sm_90 at every tile of
    the sweeps, at the model's heads (16 of 32, 256 tokens); no GPU needed."""
    from crossfuse_fast.kernels.compile_inspector import compile_only, resource_usage

    for dtype in dtypes:
        case = str(dtype).removeprefix("torch.")
        q, k, v, grad = (torch.randn(2, HEADS, TOKENS, HEAD_DIM, dtype=dtype) for _ in range(4))
        out, lse = torch.empty_like(q), torch.zeros(2 * HEADS, TOKENS)
        grads = [torch.empty_like(q) for _ in range(3)]
        sweeps = [("forward", tiles) for tiles in FORWARD_TILES] + [("backward", tiles) for tiles in BACKWARD_TILES]
        for direction, tiles in sweeps:
            with compile_only() as launches:
                if direction == "forward":
                    attention_fwd(q, k, v, out, reverse=True, scale=default_scale(HEAD_DIM), tiles=tiles)
                else:
                    attention_bwd(grad, q, k, v, out, lse, *grads, reverse=True, scale=default_scale(HEAD_DIM),
                                  tiles=tiles)
            for launch in launches:
                if "preprocess" not in launch.name:
                    yield direction, tiles, resource_usage(launch, case)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--backward-only", action="store_true")
    parser.add_argument("--registers", action="store_true", help="compile each tile for sm_90 instead of timing")
    args = parser.parse_args()
    if args.registers:
        for direction, tiles, row in tile_resources():
            print(f"{row.name:28} {row.case:9} {tiles}  regs {row.registers:3d}  stack {row.stack_bytes:5d}  "
                  f"shared {row.shared_bytes:6d}", flush=True)
        return
    for dtype, windows in itertools.product(DTYPES, WINDOWS):
        if not args.backward_only:
            sweep_forward(dtype, windows)
        if not args.forward_only:
            sweep_backward(dtype, windows)


if __name__ == "__main__":
    main()
