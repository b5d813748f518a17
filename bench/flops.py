"""Counting the work of a case: FLOPs per layer and the fewest bytes it must move.

The count runs the reference on the ``meta`` device (shapes only, no arithmetic) with forward
hooks, so it follows the real shapes of any image size, batch and window count. Conventions,
one multiply-add = 2 FLOPs:

- ``Conv2d``: ``2 * (Cin / groups) * kh * kw * Cout * Hout * Wout * B`` (+ ``Cout*Hout*Wout*B``
  with a bias). The fixed box filters of the fusion decoder are counted as the dense convs the
  reference runs (docs/model.md#cost: about 12 GFLOP at 640 x 480 that algebra can remove).
- ``Linear``: ``2 * in * out * rows`` (+ ``out * rows`` with a bias).
- Attention: ``q k^T`` and ``A v``, ``2 * 2 * B * heads * N * N * head_dim``; the softmax's
  ``~5 * B * heads * N * N`` element operations are listed apart as ``elementwise``.
- Everything else (padding, pooling, norms, GELU, concatenation) is memory traffic, not counted
  as FLOPs.

For a training step the backward pass is counted as twice the forward FLOPs of the layers that
get gradients (the usual 3x rule); frozen encoders count their forward only.

``min_bytes``: every input read once, every output written once, every parameter read once
(training: also its gradient written, Adam's two moments read and written, the update
written: 7 parameter-sized transfers). This is the floor no implementation can go under.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from crossfuse_fast.model import CrossFuse
from crossfuse_fast.reference.transformer import CrossAttention, SelfAttention

ADAM_PARAMETER_TRANSFERS = 7


def conv2d_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    batch, out_channels, height, width = output.shape
    kh, kw = module.kernel_size
    macs = (module.in_channels // module.groups) * kh * kw * out_channels * height * width * batch
    return 2 * macs + (out_channels * height * width * batch if module.bias is not None else 0)


def linear_flops(module: nn.Linear, output: torch.Tensor) -> int:
    rows = output.numel() // module.out_features
    return 2 * module.in_features * module.out_features * rows + (output.numel() if module.bias is not None else 0)


def attention_flops(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """``q k^T`` and ``A v`` of one attention call on ``[batch, heads, tokens, head_dim]``."""
    return 2 * 2 * batch * heads * tokens * tokens * head_dim


def softmax_elementwise(batch: int, heads: int, tokens: int) -> int:
    """Scale, max, subtract, exp, sum and divide over the ``tokens x tokens`` scores."""
    return 5 * batch * heads * tokens * tokens


@dataclass
class Count:
    """FLOPs by layer name, plus element operations kept apart."""

    by_layer: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    elementwise: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_layer.values())


def count_forward(module: nn.Module, run: Callable[[], object]) -> Count:
    """FLOPs of ``run()`` (which calls ``module``), counted with hooks on its layers."""
    count = Count()
    handles = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv2d):
            def hook(mod, args, out, name=name):
                count.by_layer[name] += conv2d_flops(mod, out)
        elif isinstance(layer, nn.Linear):
            def hook(mod, args, out, name=name):
                count.by_layer[name] += linear_flops(mod, out)
        elif isinstance(layer, (SelfAttention, CrossAttention)):
            def hook(mod, args, out, name=name):
                batch, tokens, dim = out.shape
                count.by_layer[f"{name}.scores"] += attention_flops(batch, mod.heads, tokens, dim // mod.heads)
                count.elementwise += softmax_elementwise(batch, mod.heads, tokens)
        else:
            continue
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return count


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def parameter_bytes(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad or not trainable_only)


def breakdown_table(height: int = 480, width: int = 640) -> list[str]:
    """Markdown table of one pair's forward FLOPs by layer group (docs/model.md#cost, counted)."""
    model = CrossFuse().to("meta").eval()
    image = torch.empty(1, 1, height, width, device="meta")
    count = count_forward(model, lambda: model(image, image))

    def group(name: str) -> str:
        if ".weight.conv_" in name:
            return "fusion decoder: fixed box filters (dense convs, removable by algebra)"
        parts = name.split(".")
        if parts[1] == "fea_encoder1":
            return f"{parts[0]}: " + (" ".join(parts[2:4]) if parts[2] == "dense_blocks" else parts[2])
        if parts[1] == "cross_atten_block":
            return f"cross encoder: {parts[2]}"
        return f"fusion decoder: {parts[2] if parts[1] == 'decoder_fusion' else parts[1]}"

    totals: dict[str, int] = defaultdict(int)
    for name, flops in count.by_layer.items():
        totals[group(name)] += flops
    lines = [f"| layer group ({height} x {width}, batch 1) | GFLOP |", "|---|---|"]
    lines += [f"| {name} | {flops / 1e9:.2f} |" for name, flops in totals.items()]
    lines.append(f"| total | {count.total / 1e9:.2f} |")
    lines.append(f"| (softmax element operations, not in the total) | {count.elementwise / 1e9:.3f} |")
    return lines
