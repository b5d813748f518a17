"""When a registered op can be skipped in favour of calling its implementation directly."""
from __future__ import annotations

import torch


def direct_call(*tensors: torch.Tensor) -> bool:
    """True outside ``torch.compile`` when no input needs a gradient.

    Then the op's autograd and compiler registration add nothing but Python dispatch (tens of
    microseconds per call, which dominates small inference batches), so the public functions
    call the same implementation the op wraps.
    """
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
