"""Sweep the attention kernels' tiles on a GPU, against SDPA on negated queries.

``python -m bench.attention_tiles`` prints, per (dtype, windows), the four fastest forward
tiles (``triton.testing.do_bench`` median) with their ratio to SDPA's forward, then the
backward tiles against SDPA's backward, to choose ``forward_tiles`` and ``backward_tiles``.
Not a results file: the harness (``python -m bench``) records the numbers that count.
``--backward-only`` / ``--forward-only`` halve the run; the backward sweep is 54 tiles per
case, so give it a long time limit (``python -m bench.gpu_compile`` shows, without a GPU,
which tiles spill registers).
"""
from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from crossfuse_fast.kernels.attention import Tiles, attention_bwd, attention_fwd, default_scale

HEADS, TOKENS, HEAD_DIM = 16, 256, 32
FORWARD_TILES = [Tiles(*shape) for shape in itertools.product((32, 64, 128), (32, 64), (2, 4, 8), (1, 2, 3))]
BACKWARD_TILES = [Tiles(*shape) for shape in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3))]
"""The tiles each sweep times (``bench.gpu_compile --attention-tiles`` compiles the same ones)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--backward-only", action="store_true")
    args = parser.parse_args()
    for dtype, windows in itertools.product(DTYPES, WINDOWS):
        if not args.backward_only:
            sweep_forward(dtype, windows)
        if not args.forward_only:
            sweep_backward(dtype, windows)


if __name__ == "__main__":
    main()
