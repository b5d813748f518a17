"""How every fused op is registered: one ``crossfuse::`` custom op, its fake, its backward, a direct call.

:class:`FusedOp` does the registration that each op of this package needs, so that an op file
holds only what is its own: the implementation (launchers on real tensors), the fake (output
shapes for ``torch.compile`` and ``opcheck``), and, where the op has gradients, what its
forward saves and how its backward turns saved tensors into gradients. A backward that launches
kernels is itself a ``FusedOp`` without autograd, so the compiler sees it as one opaque node too.

Why ``torch.library.custom_op`` and not ``torch.library.triton_op``: a ``triton_op`` lets
Inductor see the kernels, but on a CPU the kernels run in Triton's interpreter, which Inductor
cannot trace: fake tensors reach the interpreter (without a registered fake), or Inductor lowers
the op's body and the interpreter dereferences its storage (with one). The suite, which runs on a
CPU, would then test another registration than the GPU runs. A custom op is opaque to Inductor
on both, and the same code is tested on both.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _tensors(args) -> list[Tensor]:
    """The tensors among ``args``, and among the lists of tensors there."""
    found = []
    for a in args:
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found += [t for t in a if isinstance(t, Tensor)]
    return found


def direct_call(*args) -> bool:
    """True outside ``torch.compile`` when no tensor among ``args`` (or in a list there) needs a gradient.

    Then the op's autograd and compiler registration add nothing but Python dispatch (tens of
    microseconds per call, which dominates small inference batches), so :class:`FusedOp` calls
    the implementation it wraps.
    """
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args)))


class FusedOp:
    """``crossfuse::<name>``: ``impl`` registered as a custom op with ``fake`` and, when ``backward`` is
    given, its autograd formula. ``mutates_args`` names the arguments ``impl`` writes into (none,
    unless given).

    ``impl`` must be annotated (the op's schema comes from its annotations). ``fake(*args)``
    returns empty outputs of the right shapes; ``setup_context(ctx, inputs, output)`` saves what
    ``backward(ctx, *grad_outputs)`` needs, and ``backward`` returns one gradient (or None) per
    input. Calling the ``FusedOp`` runs ``impl`` directly where :func:`direct_call` allows, the
    registered op otherwise; ``.op`` is the registered op itself. A float64 tensor argument
    raises ``ValueError``: the kernels take 32- and 16-bit floats (the twins take float64).
    """

    def __init__(self, name: str, impl: Callable, fake: Callable, *, backward: Callable | None = None,
                 setup_context: Callable | None = None, mutates_args: tuple[str, ...] = ()):
        self.name = name
        self.impl = impl
        self.op = torch.library.custom_op(f"crossfuse::{name}", impl, mutates_args=mutates_args)
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        if any(t.dtype == torch.float64 for t in _tensors(args)):
            raise ValueError(f"crossfuse::{self.name} takes float32, float16 or bfloat16 tensors, not float64; "
                             "its PyTorch twin takes float64")
        return (self.impl if direct_call(*args) else self.op)(*args)
