"""What machine a run is on, and its measured ceilings (peak matmul FLOP/s, copy bandwidth)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

from .timing import Timer


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict[str, str | int]:
    """Machine, processor, accelerator and software versions for a results row."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without .git (the GPU machine): the caller may say which commit it is.
        commit = os.environ.get("BENCH_COMMIT", "unknown")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, str | int] = {
        "cpu": cpu_name(), "cores": cores, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "commit": commit, "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["machine"] = f"{info['gpu']}"
        # PyTorch's defaults: cuDNN convolutions in TF32, float32 matrix products in full fp32.
        info["cudnn_tf32"] = int(torch.backends.cudnn.allow_tf32)
        info["matmul_tf32"] = int(torch.backends.cuda.matmul.allow_tf32)
    else:
        info["machine"] = f"{info['cpu']} x{cores}"
    return info


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    """Peak FLOP/s of a large matrix product per dtype and copy bandwidth (read + write bytes).

    The best of the sizes tried: a ceiling is what the machine can do, and one slow reading
    (a CPU not yet at its clock) would make every fraction of it look too good.
    """
    timer = Timer(device)
    ceilings: dict[str, float] = {}
    sizes = (1024, 2048) if device.type == "cpu" else (8192,)
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        rates = []
        for size in sizes:
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            rates.append(2 * size ** 3 / timer.median(lambda: torch.mm(a, b), repeats=5 if quick else 10))
        ceilings[f"matmul_{str(dtype).removeprefix('torch.')}_flops"] = max(rates)
    if device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            a = torch.randn(size, size, device=device)
            b = torch.randn(size, size, device=device)
            ceilings["matmul_tf32_flops"] = 2 * size ** 3 / timer.median(lambda: torch.mm(a, b), repeats=10)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    elements = (64 if device.type == "cpu" else 512) * 2 ** 20
    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    seconds = timer.median(lambda: target.copy_(source), repeats=5 if quick else 10)
    ceilings["copy_bytes_per_s"] = 2 * source.numel() * source.element_size() / seconds
    return ceilings
