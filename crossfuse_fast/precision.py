"""The arithmetic a fusion runs in: ``fuse(..., precision=...)`` and ``crossfuse fuse --precision``.

- ``"fp32"`` (default): IEEE float32 throughout, what the reference computes.
- ``"tf32"``: float32 maps, the products of the GEMMs and convolutions in TF32 on a GPU
  (PyTorch's ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
  for the call, which our convolution kernels follow too); a CPU has no TF32, so there it is fp32.
- ``"bf16"``, ``"fp16"``: the fast path on a 16-bit copy of the weights, every map in 16 bits and
  every convolution and GEMM accumulating in fp32, except where 16 bits would show in the
  picture: the decoder's weighting (its weights divide by sums that can nearly cancel,
  docs/model.md#numerics-of-the-deep-weighting) and the final per-image min-max stretch run in
  fp32, as do the BatchNorms folded into the convolutions and the fixed box filters. The fused
  image is float32. The error against fp32 is measured in bench/ (``python -m bench.precision``)
  and given in the README. It is large where the deep weights' denominator nearly cancels
  (:func:`deep_weighting_conditioning` over :data:`CONDITIONING_LIMIT`): such an image is fused
  again in fp32, with a :class:`SixteenBitFallback` warning.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .model import CrossFuse
from .reference.fusion import SourceWeights
from .tensor_versions import versions

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DEFAULT_PRECISION = "fp32"
SIXTEEN_BITS = {"bf16": torch.bfloat16, "fp16": torch.float16}
CONDITIONING_LIMIT = 40.0
"""Above this :func:`deep_weighting_conditioning`, an image is fused again in fp32: between the
conditioning of the pairs whose 16-bit images stayed within a few grey levels of fp32 and that of
those that did not, as measured in bench/NOTES.md ("Precision on real pairs")."""


class SixteenBitFallback(RuntimeWarning):
    """Images of a 16-bit call whose deep weighting was too ill-conditioned for 16 bits, fused in fp32
    instead: ``images`` their indices in the batch, ``conditioning`` their values."""

    def __init__(self, message: str, images: list[int], conditioning: list[float]):
        super().__init__(message)
        self.images = images
        self.conditioning = conditioning


def deep_weighting_conditioning(ir_deep: torch.Tensor, vis_deep: torch.Tensor) -> torch.Tensor:
    """Per image, ``max (|g_ir| + |g_vis|) / (|g_ir + g_vis| + 1e-6)`` over the deep pixels, ``g`` the
    3 x 3 box mean of a deep map's channel sum (the decoder's activity, up to its scale), in fp32:
    how much the deep weights ``g / (g_ir + g_vis + 1e-6)`` magnify a relative change of the deep
    maps. 1 where the activities share a sign; large where they nearly cancel."""
    from .kernels.source_weighting import box_mean_of_channel_sum
    g_ir, g_vis = (box_mean_of_channel_sum(x.float()) for x in (ir_deep, vis_deep))
    ratio = (g_ir.abs() + g_vis.abs()) / ((g_ir + g_vis).abs() + 1e-6)
    return ratio.flatten(1).amax(1)


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def tf32_allowed(precision: str) -> Iterator[None]:
    """With ``"tf32"``, PyTorch's TF32 switches on for the block (and put back after); otherwise
    nothing. The switches are global: a thread running fp32 meanwhile would run TF32 too."""
    if precision != "tf32":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _kept_in_fp32(model: nn.Module) -> set[int]:
    """The modules a 16-bit copy keeps in fp32: BatchNorms (folded in fp32) and the box filters."""
    kept = set()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            kept.add(id(module))
        elif isinstance(module, SourceWeights):
            kept.update(id(inner) for inner in module.modules())
    return kept


def sixteen_bit_copy(model: CrossFuse, dtype: torch.dtype) -> CrossFuse:
    """A copy of ``model`` whose weights are ``dtype``, but for what :func:`_kept_in_fp32` names."""
    copied = copy.deepcopy(model)
    kept = _kept_in_fp32(copied)
    with torch.no_grad():
        for module in copied.modules():
            if id(module) in kept:
                continue
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.is_floating_point():
                    converted = tensor.to(dtype)
                    if isinstance(tensor, nn.Parameter):
                        converted = nn.Parameter(converted, requires_grad=tensor.requires_grad)
                    setattr(module, name, converted)
    return copied


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``model -> {dtype: (the weights' identities and versions, the copy)}`` for :func:`model_in`."""


def model_in(model: CrossFuse, precision: str) -> CrossFuse:
    """``model`` itself for fp32 and tf32; for 16 bits its 16-bit copy, made once and kept (while the
    model lives) until one of its weights changes."""
    check_precision(precision)
    if precision not in SIXTEEN_BITS:
        return model
    dtype = SIXTEEN_BITS[precision]
    fingerprint = versions([*model.parameters(), *model.buffers()])  # None: copied again every time
    copies = _COPIES.setdefault(model, {})
    cached = copies.get(dtype)
    if fingerprint is None or cached is None or cached[0] != fingerprint:
        cached = copies[dtype] = (fingerprint, sixteen_bit_copy(model, dtype))
    return cached[1]
