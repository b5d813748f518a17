"""The compile inspector: the Triton kernels compiled for a GPU on a machine without one, and what they use.

Triton's NVIDIA backend ships ``ptxas``, so a kernel compiles to a cubin for an H100 or H200
(``sm_90``) on any Linux machine: the real code generator, not the interpreter.
:func:`compile_only` turns every Triton launch into that compilation; the launchers run as
usual on CPU tensors (whose contents then mean nothing), so each kernel compiles with exactly
the arguments, specialisations and tiles the model gives it. :func:`resource_usage` reads the
registers, the stack (register spills) and the shared memory from the cubin.

    python -m crossfuse_fast.kernels.compile_inspector         # the fast encoder's kernels, fwd and bwd, and the conv
    python -m crossfuse_fast.kernels.compile_inspector --json  # the same rows as JSON (the compile tests)
    python -m bench.attention_tiles --registers                # registers and spills of each swept tile

Run it without ``TRITON_INTERPRET``: kernels defined under the interpreter cannot be compiled.
Only kernels' compilation is checked here; their numbers are checked by the tests, their speed
by ``python -m bench`` on a GPU. Not imported by ``crossfuse_fast.kernels`` (it reaches into
Triton's driver and compiler internals): a development tool, run on its own.
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

from ..reference.transformer import CrossEncoder

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
    from ..fast import FastCrossEncoder  # the fast path imports this package: only when run

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


CONV_LAYERS = ((1, 32, 3), (64, 64, 3), (32, 1, 1))
"""(in, out, kernel) of convolutions that give the distinct tiles of the model's layers: the first
conv, the dense blocks and decoders (64 or more channels each way), the last 1 x 1 conv."""


def conv_resources(dtypes=(torch.float32, torch.bfloat16)) -> list[Resources]:
    """The implicit-GEMM convolution (forward, with the pool in its epilogue, and backward, its input
    gradient also added into a dense buffer's), the max-pool's backward, and the upsampled
    convolution (forward and backward), compiled at the model's tile shapes, on channels_last maps."""
    from .dense_encoder import max_pool_bwd
    from .implicit_gemm_conv import conv2d_bwd, conv2d_fwd, conv2d_pool_fwd
    from .upsample_fold import upsampled_conv_bwd, upsampled_conv_fwd

    rows = []
    for dtype in dtypes:
        for in_channels, out_channels, kernel in CONV_LAYERS:
            x = torch.randn(1, in_channels, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
            weight = torch.randn(out_channels, in_channels, kernel, kernel, dtype=dtype)
            out = torch.empty(1, out_channels, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with compile_only() as launches:
                conv2d_fwd(x, weight, torch.zeros(out_channels, dtype=dtype), out, padding_mode="reflect")
                conv2d_bwd(out, x, weight, padding_mode="reflect")
                if kernel == 3:
                    conv2d_bwd(out, x, weight, padding_mode="reflect", add_into=torch.empty_like(x))
                    conv2d_pool_fwd(x, weight, torch.zeros(out_channels, dtype=dtype), out[:, :, :4, :4], out,
                                    padding_mode="reflect")
                    max_pool_bwd(out, out[:, :, :4, :4])
                    phases = torch.randn(4 * out_channels, in_channels, 2, 2, dtype=dtype)
                    upsampled = upsampled_conv_fwd(x, phases, torch.zeros(out_channels, dtype=dtype))
                    upsampled_conv_bwd(upsampled, x, phases)
            rows += [resource_usage(launch, str(dtype).removeprefix("torch.")) for launch in launches]
    return rows


def weighting_resources(dtypes=(torch.float32, torch.bfloat16)) -> list[Resources]:
    """The fusion decoder's weighted sums (deep: 128 channels, shallow: 32, reading a smaller map
    through the size adjust), on channels_last maps, its final min-max stretch, alone and after
    conv_last (32 -> 1, 1 x 1), and the size adjust (forward with the upsampling and the added
    map, and backward)."""
    from .minmax_stretch import conv2d_minmax_to_255_fwd, minmax_to_255_fwd
    from .size_adjust import size_adjust_bwd, size_adjust_fwd
    from .source_weighting import weighted_sum_fwd

    rows = []
    for dtype in dtypes:
        for channels, deep in ((128, True), (32, False)):
            maps = [torch.randn(1, channels, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    for _ in range(3)]
            with compile_only() as launches:
                weighted_sum_fwd(maps[0] if deep else maps[0][:, :, :6, :6], *maps[1:], 1.0, deep=deep)
                if deep:
                    minmax_to_255_fwd(maps[0][:, :1])
                else:
                    conv2d_minmax_to_255_fwd(maps[0], torch.randn(1, channels, 1, 1, dtype=dtype),
                                             torch.zeros(1, dtype=dtype), padding_mode="reflect")
                    size_adjust_fwd(maps[0][:, :, :3, :3], 8, 8, True, maps[1])
                    size_adjust_bwd(maps[0], 3, 3, True)
            rows += [resource_usage(launch, str(dtype).removeprefix("torch.")) for launch in launches]
    return rows


def print_table(rows: list[Resources]) -> None:
    print(f"{'kernel':34} {'dtype':9} {'regs':>5} {'stack':>6} {'shared':>7} tensor cores")
    for row in rows:
        cores = "yes" if row.tensor_cores else ("no" if row.has_dot else "-")
        print(f"{row.name:34} {row.case:9} {row.registers:5d} {row.stack_bytes:6d} {row.shared_bytes:7d} {cores}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = fast_encoder_resources() + conv_resources() + weighting_resources()
    if args.json:
        print(json.dumps([asdict(row) for row in rows]))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
