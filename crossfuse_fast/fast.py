"""The fast path's transformer half: the reference cross encoder's weights run through fused ops.

``FastCrossEncoder(reference_encoder, backend)`` holds the reference module itself (so both
run, and train, the very same parameters) and computes the same function with:

- tokens kept in the patched layout from the first block to the last (the roll of SPEC 2.3
  only permutes tokens, so it is dropped: the same function up to rounding);
- attention reading q, k, v straight from the projection GEMMs (``qkv`` for self blocks; ``q``
  and one merged ``k | v`` GEMM for the cross blocks, whose ``k_linear`` and ``v_linear`` read
  the same normalised input) and writing the heads merged;
- LayerNorm fused with the residual add before it, and ``fc1``'s bias fused with its GELU.

``backend="triton"`` uses the Triton kernels (a GPU, or ``TRITON_INTERPRET=1`` on a CPU);
``backend="torch"`` their PyTorch twins, which is the CPU path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .reference.functional import patchify, unpatchify
from .reference.transformer import CrossEncoder, CrossModule, SelfModule

BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Ops:
    """The fused ops of one backend, all with the signatures of the Triton functions."""

    layer_norm: Callable
    add_layer_norm: Callable
    bias_gelu: Callable
    self_attention: Callable
    cross_attention: Callable


OPS = {
    "torch": Ops(kernels.layer_norm_torch, kernels.add_layer_norm_torch, kernels.bias_gelu_torch,
                 kernels.self_attention_torch, kernels.cross_attention_torch),
    "triton": Ops(kernels.layer_norm, kernels.add_layer_norm, kernels.bias_gelu, kernels.self_attention,
                  kernels.cross_attention),
}


def _norm(ops: Ops, norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


def _add_norm(ops: Ops, norm: nn.LayerNorm, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)``."""
    return ops.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)


def _mlp(ops: Ops, mlp: nn.Module, x: Tensor) -> Tensor:
    return F.linear(ops.bias_gelu(F.linear(x, mlp.fc1.weight), mlp.fc1.bias), mlp.fc2.weight, mlp.fc2.bias)


def self_module(ops: Ops, module: SelfModule, x: Tensor) -> Tensor:
    """A reference ``SelfModule`` on tokens ``[W, N, C]`` (its unused ``norm`` stays unused)."""
    for block in module.blocks:
        attn = block.attn
        qkv = F.linear(_norm(ops, block.norm1, x), attn.qkv.weight, attn.qkv.bias)
        mixed = F.linear(ops.self_attention(qkv, attn.heads, reverse=False), attn.proj.weight, attn.proj.bias)
        normed, x = _add_norm(ops, block.norm2, x, mixed)
        x = x + _mlp(ops, block.mlp, normed)
    return x


def cross_module(ops: Ops, module: CrossModule, xa: Tensor, xb: Tensor) -> Tensor:
    """A reference ``CrossModule`` on tokens: queries from ``xa``, keys, values and residual from ``xb``."""
    first, second, third = xa, xb, xb
    for block in module.blocks:
        attn = block.attn
        n0 = _norm(ops, block.norm1, first)
        n1 = _norm(ops, block.norm1, second)
        q = F.linear(n0, attn.q_linear.weight, attn.q_linear.bias)
        if third is second:  # keys and values read the same normalised tokens: one GEMM
            kv = F.linear(n1, torch.cat([attn.k_linear.weight, attn.v_linear.weight]),
                          torch.cat([attn.k_linear.bias, attn.v_linear.bias]))
        else:
            n2 = _norm(ops, block.norm1, third)
            kv = torch.cat([F.linear(n1, attn.k_linear.weight, attn.k_linear.bias),
                            F.linear(n2, attn.v_linear.weight, attn.v_linear.bias)], dim=-1)
        mixed = F.linear(ops.cross_attention(q, kv, attn.heads, reverse=True), attn.proj.weight, attn.proj.bias)
        normed, y = _add_norm(ops, block.norm2, third, mixed)
        third, y = _add_norm(ops, module.norm, y, _mlp(ops, block.mlp, normed))
        first, second = n0, y
    return third


class FastCrossEncoder(nn.Module):
    """Same function as ``reference`` (a :class:`CrossEncoder`) on windows ``[W, 128, 32, 32]``."""

    def __init__(self, reference: CrossEncoder, backend: str = "torch"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        self.reference = reference
        self.backend = backend

    def forward(self, ir: Tensor, vis: Tensor, shift: bool = True) -> Tensor:
        """``shift`` is accepted for the reference's signature; the roll is a token permutation."""
        ops = OPS[self.backend]
        height, width = ir.shape[-2:]
        encoder = self.reference
        t_ir, t_vis = patchify(ir), patchify(vis)
        for stage in (encoder.self_atten_block1, encoder.self_atten_block2):
            t_ir = self_module(ops, stage.self_atten1, t_ir)
            t_vis = self_module(ops, stage.self_atten2, t_vis)
        cross = encoder.cross_atten_block
        fused = cross_module(ops, cross.cross_atten1, t_ir, t_vis) + cross_module(ops, cross.cross_atten2, t_vis, t_ir)
        return unpatchify(fused, height, width)
