"""Shared fixtures. The suite needs neither ../shared nor a GPU: pairs are synthetic."""
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when the
# kernels are defined: set it before anything imports crossfuse_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from crossfuse_fast import CrossFuse

DATA = Path(__file__).parent / "data"


def random_bn_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine terms, as trained ones have."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="session")
def model() -> CrossFuse:
    """A CrossFuse with seeded random weights, in eval mode."""
    torch.manual_seed(1234)
    return random_bn_statistics(CrossFuse()).eval()


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fresh floating-point buffers start as NaN, so any element a kernel fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def pytest_configure(config):
    # Torch uses both cores of the CI machine; more threads only contend.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
