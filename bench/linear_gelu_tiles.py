"""Sweep the fused ``fc1`` + GELU GEMM's tiles on a GPU, against cuBLAS with and without the GELU pass.

``python -m bench.linear_gelu_tiles`` prints, per (dtype, windows), the four fastest tiles
(``triton.testing.do_bench`` median) beside cuBLAS's ``F.linear`` followed by the bias+GELU
kernel (what the fused kernel replaces) and ``F.linear`` alone (a GEMM with no GELU at all), to
choose ``GemmTiles``' defaults. Not a results file: ``python -m bench`` records the numbers
that count (case ``mlp fc1``).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton

from crossfuse_fast.kernels.gelu import bias_gelu
from crossfuse_fast.kernels.gemm_gelu import GemmTiles, linear_gelu_fwd

TOKENS, IN_FEATURES, OUT_FEATURES = 256, 512, 2048


def main() -> None:
    configs = [GemmTiles(m, n, k, 8, w, s) for m, n, k, w, s in
               itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4))]
    for dtype, windows in itertools.product((torch.bfloat16, torch.float16), (48, 384)):
        x = torch.randn(windows * TOKENS, IN_FEATURES, device="cuda", dtype=dtype)
        weight = torch.randn(OUT_FEATURES, IN_FEATURES, device="cuda", dtype=dtype) * IN_FEATURES ** -0.5
        bias = torch.randn(OUT_FEATURES, device="cuda", dtype=dtype)
        unfused = triton.testing.do_bench(lambda: bias_gelu(F.linear(x, weight), bias), return_mode="median")
        gemm_only = triton.testing.do_bench(lambda: F.linear(x, weight, bias), return_mode="median")
        results = []
        for tiles in configs:
            try:
                ms = triton.testing.do_bench(lambda tiles=tiles: linear_gelu_fwd(x, weight, bias, save_pre=False,
                                                                                  tiles=tiles), return_mode="median")
            except Exception as error:  # a tile shape that does not fit the chip's shared memory
                print(f"{dtype} w{windows} {tiles}: {type(error).__name__}")
                continue
            results.append((ms, tiles))
        results.sort(key=lambda item: item[0])
        for ms, tiles in results[:4]:
            print(f"{str(dtype)[6:]:9} w{windows:<4} {tiles}  {ms * 1e3:8.1f} us  cuBLAS+GELU {unfused * 1e3:8.1f} us "
                  f"({unfused / ms:4.2f}x)  cuBLAS alone {gemm_only * 1e3:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
