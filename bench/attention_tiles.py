"""Sweep the attention forward kernel's tiles on a GPU, against SDPA on negated queries.

``python -m bench.attention_tiles`` prints one line per (dtype, windows, tiles) with the median
time (``triton.testing.do_bench``) and the ratio to SDPA, to choose ``forward_tiles``. Not a
results file: the harness (``python -m bench``) records the numbers that count.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton

from crossfuse_fast.kernels.attention import Tiles, attention_fwd, default_scale

HEADS, TOKENS, HEAD_DIM = 16, 256, 32


def main() -> None:
    configs = [Tiles(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64), (4, 8), (1, 2, 3))]
    for dtype, windows in itertools.product((torch.float32, torch.bfloat16), (6, 48, 384)):
        q, k, v = (torch.randn(windows, HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(3))
        out = torch.empty_like(q)
        sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(-q, k, v), return_mode="median")
        results = []
        for tiles in configs:
            try:
                ms = triton.testing.do_bench(
                    lambda: attention_fwd(q, k, v, out, reverse=True, scale=default_scale(HEAD_DIM), tiles=tiles),
                    return_mode="median")
            except Exception as error:  # a tile shape that does not fit the chip's shared memory
                print(f"{dtype} w{windows} {tiles}: {type(error).__name__}")
                continue
            results.append((ms, tiles))
        results.sort(key=lambda item: item[0])
        for ms, tiles in results[:4]:
            print(f"{str(dtype)[6:]:9} w{windows:<4} {tiles}  {ms * 1e3:8.1f} us  sdpa {sdpa * 1e3:8.1f} us  "
                  f"{sdpa / ms:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
