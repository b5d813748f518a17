"""The cross encoder on the fast path: the reference's own weights through the fused ops
(docs/fast-path.md#the-cross-encoder)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import DEFAULT_KERNEL_BACKEND, check_kernel_backend
from ..reference.functional import PATCH, WINDOW
from ..reference.transformer import EMBED_DIM, CrossAttention, CrossEncoder, CrossModule, SelfModule
from .cache import Derived
from .layout import is_channels_last
from .ops import Ops, ops_for

DEEP_CHANNELS = EMBED_DIM // (PATCH * PATCH)
"""Channels of the deep maps whose 2 x 2 patches are the encoder's tokens."""


def _norm(ops: Ops, norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


def _add_norm(ops: Ops, norm: nn.LayerNorm, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)``."""
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)


def _mlp(ops: Ops, mlp: nn.Module, x: Tensor) -> Tensor:
    return F.linear(ops.linear_gelu(x, mlp.fc1.weight, mlp.fc1.bias), mlp.fc2.weight, mlp.fc2.bias)


@dataclass(frozen=True)
class MapOutput:
    """Where the last cross module writes: its sum with ``plus`` as a ``height x width`` map of windows."""

    plus: Tensor
    height: int
    width: int
    window: tuple[int, int]


@dataclass(frozen=True)
class Stream:
    """Tokens ``x + addend``: a block's last residual add, left to the next LayerNorm so that one
    pass adds and normalises (``addend`` None: the tokens are ``x``)."""

    x: Tensor
    addend: Tensor | None = None

    def normalised(self, ops: Ops, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
        """``(norm(tokens), tokens)``."""
        if self.addend is None:
            return _norm(ops, norm, self.x), self.x
        return _add_norm(ops, norm, self.addend, self.x)


def self_module(ops: Ops, module: SelfModule, stream: Stream, normed: Tensor | None = None) -> Stream:
    """A reference ``SelfModule`` on tokens ``[W, N, C]`` (its unused ``norm`` stays unused).

    ``normed``, when given, is the first block's ``norm1`` of ``stream`` (which then has no
    addend), already computed. The output's last residual add is left pending.
    """
    for block in module.blocks:
        attn = block.attn
        if normed is None:
            normed, x = stream.normalised(ops, block.norm1)
        else:
            x = stream.x
        qkv = F.linear(normed, attn.qkv.weight, attn.qkv.bias)
        mixed = F.linear(ops.self_attention(qkv, attn.heads, reverse=False), attn.proj.weight, attn.proj.bias)
        normed, x = _add_norm(ops, block.norm2, x, mixed)
        stream = Stream(x, _mlp(ops, block.mlp, normed))
        normed = None
    return stream


def merged_kv_weights(attn: CrossAttention) -> tuple[Tensor, Tensor]:
    """The weight and bias of one GEMM computing ``k_linear`` and ``v_linear`` of the same tokens."""
    return (torch.cat([attn.k_linear.weight, attn.v_linear.weight]),
            torch.cat([attn.k_linear.bias, attn.v_linear.bias]))


def cross_module(ops: Ops, module: CrossModule, xa: Tensor, xb: Tensor, to_map: MapOutput | None = None, *,
                 kv_weights: Callable[[CrossAttention], tuple[Tensor, Tensor]],
                 normed: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """A reference ``CrossModule`` on tokens: queries from ``xa``, keys, values and residual from ``xb``.

    ``normed``, when given, is the first block's ``(norm1(xa), norm1(xb))``, already computed.
    With ``to_map``, returns ``to_map.plus`` + the module's output, as the map the tokens were cut from.
    ``kv_weights`` gives :func:`merged_kv_weights` of a block's attention, or the same cached.
    """
    first, second, third = xa, xb, xb
    for index, block in enumerate(module.blocks):
        attn = block.attn
        n0, n1 = normed if normed is not None else (_norm(ops, block.norm1, first), _norm(ops, block.norm1, second))
        normed = None
        q = F.linear(n0, attn.q_linear.weight, attn.q_linear.bias)
        if third is second:  # keys and values read the same normalised tokens: one GEMM
            kv = F.linear(n1, *kv_weights(attn))
        else:
            n2 = _norm(ops, block.norm1, third)
            kv = torch.cat([F.linear(n1, attn.k_linear.weight, attn.k_linear.bias),
                            F.linear(n2, attn.v_linear.weight, attn.v_linear.bias)], dim=-1)
        mixed = F.linear(ops.cross_attention(q, kv, attn.heads, reverse=True), attn.proj.weight, attn.proj.bias)
        normed_mlp, y = _add_norm(ops, block.norm2, third, mixed)
        if to_map is not None and index == len(module.blocks) - 1:
            norm = module.norm
            return ops.add_layer_norm_to_map(y, _mlp(ops, block.mlp, normed_mlp), to_map.plus, norm.weight,
                                             norm.bias, norm.eps, to_map.height, to_map.width, to_map.window)
        third, y = _add_norm(ops, module.norm, y, _mlp(ops, block.mlp, normed_mlp))
        first, second = n0, y
    return third


class FastCrossEncoder(nn.Module):
    """Same function as ``reference`` (a :class:`CrossEncoder`, whose own parameters it runs and
    trains), on windows or on whole deep maps, up to rounding.

    ``kernel_backend`` (:data:`~crossfuse_fast.backends.KERNEL_BACKENDS`) says what runs the fused
    ops: the Triton kernels (a GPU, or ``TRITON_INTERPRET=1`` on a CPU), their PyTorch twins, or
    ``"auto"``, by the inputs' device.
    """

    def __init__(self, reference: CrossEncoder, kernel_backend: str = DEFAULT_KERNEL_BACKEND):
        super().__init__()
        check_kernel_backend(kernel_backend)
        self.reference = reference
        self.kernel_backend = kernel_backend
        # Concatenating them is four copies and launches per forward; in inference they are made
        # once, and again when a weight changes.
        self._merged_kv = {block.attn: Derived(
            lambda attn=block.attn: (attn.k_linear.weight, attn.v_linear.weight, attn.k_linear.bias,
                                     attn.v_linear.bias),
            lambda attn=block.attn: merged_kv_weights(attn))
            for module in (reference.cross_atten_block.cross_atten1, reference.cross_atten_block.cross_atten2)
            for block in module.blocks}

    def _kv_weights(self, attn: CrossAttention) -> tuple[Tensor, Tensor]:
        """:func:`merged_kv_weights`, cached while no gradient is recorded (with one, the concatenation
        must be in the graph)."""
        return merged_kv_weights(attn) if torch.is_grad_enabled() else self._merged_kv[attn].get()

    def forward(self, ir: Tensor, vis: Tensor, shift: bool = True) -> Tensor:
        """The reference's call: each ``[128, H, W]`` entry of ``ir`` and ``vis`` is one window.

        ``shift`` is accepted for the reference's signature; the roll is a token permutation.
        """
        _check_pair(ir, vis)
        return self._run(ir, vis, tuple(ir.shape[-2:]))  # the window grid refuses odd sides

    def fuse_deep(self, ir_deep: Tensor, vis_deep: Tensor) -> Tensor:
        """``FusionNet.fuse_deep``: deep maps ``[B, 128, h, w]`` of any size, each cut into
        reflection-padded 32 x 32 windows (docs/model.md#windows-and-tokens), encoded, put back and
        cropped, all by the end ops' addressing."""
        _check_pair(ir_deep, vis_deep)
        fused = self._run(ir_deep, vis_deep, (WINDOW, WINDOW))
        if is_channels_last(ir_deep):
            # Maps in channels_last (FastCrossFuse on a CPU) get their fused map back in that layout,
            # so the decoder's sums and convolutions after it run on one layout.
            return fused.contiguous(memory_format=torch.channels_last)
        return fused

    def _run(self, ir: Tensor, vis: Tensor, window: tuple[int, int]) -> Tensor:
        ops = ops_for(self.kernel_backend, ir)
        encoder = self.reference
        first, second = encoder.self_atten_block1, encoder.self_atten_block2
        ir_stream = self_module(ops, second.self_atten1, _self_module_from_map(ops, first.self_atten1, ir, window))
        vis_stream = self_module(ops, second.self_atten2, _self_module_from_map(ops, first.self_atten2, vis, window))
        cross = encoder.cross_atten_block
        # Both cross modules read both token sets: the first materialises them (adding the pending
        # residuals while it normalises them), the second reads them.
        norm1 = cross.cross_atten1.blocks[0].norm1
        n_ir, t_ir = ir_stream.normalised(ops, norm1)
        n_vis, t_vis = vis_stream.normalised(ops, norm1)
        fused_ir = cross_module(ops, cross.cross_atten1, t_ir, t_vis, kv_weights=self._kv_weights,
                                normed=(n_ir, n_vis))
        return cross_module(ops, cross.cross_atten2, t_vis, t_ir, MapOutput(fused_ir, *ir.shape[-2:], window),
                            kv_weights=self._kv_weights)


def _self_module_from_map(ops: Ops, module: SelfModule, x: Tensor, window: tuple[int, int]) -> Stream:
    norm = module.blocks[0].norm1
    normed, tokens = ops.layer_norm_from_map(x, norm.weight, norm.bias, norm.eps, window)
    return self_module(ops, module, Stream(tokens), normed)


def _check_pair(ir: Tensor, vis: Tensor) -> None:
    if ir.dim() != 4 or ir.shape[1] != DEEP_CHANNELS:
        raise ValueError(f"expected deep features [batch, {DEEP_CHANNELS}, height, width], got shape {tuple(ir.shape)}")
    if vis.shape != ir.shape:
        raise ValueError(f"infrared and visible features differ in shape: {tuple(ir.shape)} and {tuple(vis.shape)}")
