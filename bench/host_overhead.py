"""Host time per call of each Triton op, measured without a GPU.

Small batches are host-bound: at 6 windows a Triton launch costs more on the CPU side than its
kernel runs. Under :func:`crossfuse_fast.kernels.compile_inspector.compile_only` every launch stops right after
Triton's argument binding and cache lookup, so timing the public ops there measures what a
call costs the host (our wrapper: checks, views, allocations; Triton: binding, specialisation)
minus the driver's launch itself, on any machine.

    python -m bench.host_overhead          # microseconds per call, median of 5 runs of 2000 calls
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from crossfuse_fast import kernels
from crossfuse_fast.kernels.compile_inspector import compile_only

WINDOWS, TOKENS, HEADS, HEAD_DIM, DIM = 6, 256, 16, 32, 512


def op_calls() -> dict[str, Callable[[], object]]:
    """One call of each op at the 6-window shapes of the cross encoder (inference)."""
    q, k, v = (torch.randn(WINDOWS, HEADS, TOKENS, HEAD_DIM) for _ in range(3))
    qkv = torch.randn(WINDOWS, TOKENS, 3 * DIM)
    kv = torch.randn(WINDOWS, TOKENS, 2 * DIM)
    x = torch.randn(WINDOWS, TOKENS, DIM)
    deep = torch.randn(1, DIM // 4, 64, 96)
    hidden = torch.randn(WINDOWS, TOKENS, 4 * DIM)
    weight, bias, hidden_bias = torch.randn(DIM), torch.randn(DIM), torch.randn(4 * DIM)
    x_half, fc1, fc1_bias = x.half(), torch.randn(4 * DIM, DIM).half(), hidden_bias.half()
    return {
        "attention": lambda: kernels.attention(q, k, v, reverse=True),
        "self_attention": lambda: kernels.self_attention(qkv, HEADS),
        "cross_attention": lambda: kernels.cross_attention(x, kv, HEADS),
        "layer_norm": lambda: kernels.layer_norm(x, weight, bias, 1e-6),
        "add_layer_norm": lambda: kernels.add_layer_norm(x, x, weight, bias, 1e-6),
        "layer_norm_from_map": lambda: kernels.layer_norm_from_map(deep, weight, bias, 1e-6, (32, 32)),
        "add_layer_norm_to_map": lambda: kernels.add_layer_norm_to_map(x, x, x, weight, bias, 1e-6, 64, 96,
                                                                       (32, 32)),
        "bias_gelu": lambda: kernels.bias_gelu(hidden, hidden_bias),
        "linear_gelu (fp16)": lambda: kernels.linear_gelu(x_half, fc1, fc1_bias),
    }


def main() -> None:
    with torch.no_grad(), compile_only():
        for name, call in op_calls().items():
            call()  # compiles
            runs = []
            for _ in range(5):
                begin = time.perf_counter()
                for _ in range(2000):
                    call()
                runs.append((time.perf_counter() - begin) / 2000)
            print(f"{name:24} {statistics.median(runs) * 1e6:7.1f} us per call", flush=True)


if __name__ == "__main__":
    main()
