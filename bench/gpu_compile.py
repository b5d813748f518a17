"""Compile the Triton kernels for a GPU on a machine without one, and read what they use.

Triton's NVIDIA backend ships ``ptxas``, so a kernel compiles to a cubin for an H100 or H200
(``sm_90``) on any Linux machine: the real code generator, not the interpreter.
:func:`compile_only` turns every Triton launch into that compilation; the launchers run as
usual on CPU tensors (whose contents then mean nothing), so each kernel compiles with exactly
the arguments, specialisations and tiles the model gives it. :func:`resource_usage` reads the
registers, the stack (register spills) and the shared memory from the cubin.

    python -m bench.gpu_compile                   # every kernel of the fast encoder, forward and backward
    python -m bench.gpu_compile --json            # the same rows as JSON (tests/test_kernels_compile.py)
    python -m bench.gpu_compile --attention-tiles # registers and spills of each tile bench.attention_tiles times

Run it without ``TRITON_INTERPRET``: kernels defined under the interpreter cannot be compiled.
Only kernels' compilation is checked here; their numbers are checked by the tests, their speed
by ``python -m bench`` on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from crossfuse_fast.fast import FastCrossEncoder
from crossfuse_fast.kernels.attention import attention_bwd, attention_fwd
from crossfuse_fast.reference.transformer import CrossEncoder

from .attention_tiles import BACKWARD_TILES, FORWARD_TILES, HEAD_DIM, HEADS, TOKENS

HOPPER = GPUTarget("cuda", 90, 32)
"""H100 and H200."""
MAX_SHARED_BYTES = 232448
"""Shared memory one block may use on sm_90 (227 KiB)."""


class _CompileOnlyDriver:
    """Enough of a driver for Triton to pick ``target`` and compile, with no device behind it."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@dataclass
class Launch:
    """One kernel as compiled for a launch: its name and the compiled kernel (cubin, PTX, metadata)."""

    name: str
    kernel: object


@contextlib.contextmanager
def compile_only(target: GPUTarget = HOPPER) -> Iterator[list[Launch]]:
    """Within the block, Triton launches compile for ``target`` instead of running; yields the list
    of what was compiled, one entry per launch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only needs kernels defined without TRITON_INTERPRET=1")
    launches: list[Launch] = []
    launch = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(Launch(self.fn.__name__, kernel))
        return kernel

    previous = driver._active  # None until a launch needed a driver; reset_active() would create one
    driver.set_active(_CompileOnlyDriver(target))
    JITFunction.run = compile_instead
    try:
        yield launches
    finally:
        JITFunction.run = launch
        driver.set_active(previous)


@dataclass
class Resources:
    name: str
    case: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    tensor_cores: bool
    """The PTX has Hopper (``wgmma``) or older (``mma.sync``) tensor-core instructions."""
    has_dot: bool
    fp_fusion: bool
    """Compiled with ``a * b + c`` contracted to FMA (``enable_fp_fusion``)."""


def resource_usage(launch: Launch, case: str) -> Resources:
    """Registers and stack from ``cuobjdump --dump-resource-usage`` of the cubin; shared memory as
    Triton allocates it (the launch's dynamic shared memory)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(launch.kernel.asm["cubin"])
        report = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                                check=True).stdout
    line = next(row for row in report.splitlines() if "REG:" in row)
    fields = dict(item.split(":", 1) for item in line.split() if ":" in item)
    ptx = launch.kernel.asm["ptx"]
    source = launch.kernel.asm["ttir"]
    return Resources(launch.name, case, int(fields["REG"]), int(fields["STACK"]), launch.kernel.metadata.shared,
                     "wgmma" in ptx or "mma.sync" in ptx, "tt.dot" in source, launch.kernel.metadata.enable_fp_fusion)


def fast_encoder_resources(dtypes=(torch.float32, torch.bfloat16)) -> list[Resources]:
    """Every distinct kernel the fast encoder launches, forward and backward, on a padded deep map."""
    rows, seen = [], set()
    for dtype in dtypes:
        torch.manual_seed(0)
        encoder = FastCrossEncoder(CrossEncoder().to(dtype), "triton")
        ir, vis = (torch.randn(1, 128, 40, 20, dtype=dtype, requires_grad=True) for _ in range(2))
        with compile_only() as launches:
            encoder.fuse_deep(ir, vis).sum().backward()
        for launch in launches:
            if launch.kernel.hash not in seen:
                seen.add(launch.kernel.hash)
                rows.append(resource_usage(launch, str(dtype).removeprefix("torch.")))
    return rows


def attention_tile_resources(dtypes=(torch.float32, torch.bfloat16)) -> Iterator[tuple[str, object, Resources]]:
    """``(direction, tiles, resources)`` of the attention kernels for every tile choice that
    ``bench.attention_tiles`` times on a GPU, at the model's heads (16 of 32, 256 tokens)."""
    for dtype in dtypes:
        case = str(dtype).removeprefix("torch.")
        q, k, v, grad = (torch.randn(2, HEADS, TOKENS, HEAD_DIM, dtype=dtype) for _ in range(4))
        out, lse = torch.empty_like(q), torch.zeros(2 * HEADS, TOKENS)
        grads = [torch.empty_like(q) for _ in range(3)]
        sweeps = [("forward", tiles) for tiles in FORWARD_TILES] + [("backward", tiles) for tiles in BACKWARD_TILES]
        for direction, tiles in sweeps:
            with compile_only() as launches:
                if direction == "forward":
                    attention_fwd(q, k, v, out, reverse=True, scale=0.125, tiles=tiles)
                else:
                    attention_bwd(grad, q, k, v, out, lse, *grads, reverse=True, scale=0.125, tiles=tiles)
            for launch in launches:
                if "preprocess" not in launch.name:
                    yield direction, tiles, resource_usage(launch, case)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--attention-tiles", action="store_true", help="registers and spills per attention tile")
    args = parser.parse_args(argv)
    if args.attention_tiles:
        for direction, tiles, row in attention_tile_resources():
            print(f"{row.name:28} {row.case:9} {tiles}  regs {row.registers:3d}  stack {row.stack_bytes:5d}  "
                  f"shared {row.shared_bytes:6d}", flush=True)
        return
    rows = fast_encoder_resources()
    if args.json:
        print(json.dumps([asdict(row) for row in rows]))
        return
    print(f"{'kernel':34} {'dtype':9} {'regs':>5} {'stack':>6} {'shared':>7} tensor cores")
    for row in rows:
        cores = "yes" if row.tensor_cores else ("no" if row.has_dot else "-")
        print(f"{row.name:34} {row.case:9} {row.registers:5d} {row.stack_bytes:6d} {row.shared_bytes:7d} {cores}")


if __name__ == "__main__":
    main()
