"""Stage 2's transformer half: self blocks, reversed-softmax cross blocks, the cross encoder.

Everything works on one 32 x 32 window of deep features per batch entry
(docs/model.md#windows-and-tokens, docs/model.md#blocks, docs/model.md#cross-encoder); the fusion
network cuts images into such windows before calling :class:`CrossEncoder`.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import WINDOW, attention_ref, merge_heads, patchify, split_heads, split_packed_heads, unpatchify

EMBED_DIM = 512
HEADS = 16
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6
SHIFT = WINDOW // 2


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` with the exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head self attention with one ``qkv`` projection, ordinary softmax."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_packed_heads(self.qkv(x), 3, self.heads)
        return self.proj(merge_heads(attention_ref(q, k, v, reverse=False)))


class CrossAttention(nn.Module):
    """Reversed-softmax cross attention: ``softmax(-(q k^T) / sqrt(d)) v``.

    ``qkv`` is in the released checkpoints and unused, kept so they load with ``strict=True``.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        self.v_linear = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q_linear(query), self.heads)
        k = split_heads(self.k_linear(key), self.heads)
        v = split_heads(self.v_linear(value), self.heads)
        return self.proj(merge_heads(attention_ref(q, k, v, reverse=True)))


class SelfBlock(nn.Module):
    """``x + proj(attn(LN1 x))``, then ``+ MLP(LN2 x)``."""

    def __init__(self, dim: int = EMBED_DIM, heads: int = HEADS, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """On ``[x0, x1, x2]``: queries from ``x0``, keys from ``x1``, values and residual from ``x2``.

    One ``norm1`` normalises all three inputs. Returns ``[LN1(x0), y, y]`` (docs/model.md#blocks).
    """

    def __init__(self, dim: int = EMBED_DIM, heads: int = HEADS, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        n0, n1, n2 = (self.norm1(t) for t in x)
        y = x[2] + self.attn(n0, n1, n2)
        y = y + self.mlp(self.norm2(y))
        return [n0, y, y]


class SelfModule(nn.Module):
    """Self blocks in turn. Its ``norm`` is in the checkpoints and, as released, not applied."""

    def __init__(self, depth: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(SelfBlock() for _ in range(depth))
        self.norm = layer_norm(EMBED_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class CrossModule(nn.Module):
    """Cross blocks on ``[xa, xb, xb]``; after each, the third element becomes ``norm`` of itself."""

    def __init__(self, depth: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(CrossBlock() for _ in range(depth))
        self.norm = layer_norm(EMBED_DIM)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        x = [xa, xb, xb]
        for block in self.blocks:
            x = block(x)
            x[2] = self.norm(x[2])
        return x[2]


class SelfAttentionStage(nn.Module):
    """Patch both modalities' windows, run each through its own self module, un-patch."""

    def __init__(self):
        super().__init__()
        self.self_atten1 = SelfModule()
        self.self_atten2 = SelfModule()

    def forward(self, ir: torch.Tensor, vis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = ir.shape[-2:]
        ir = unpatchify(self.self_atten1(patchify(ir)), height, width)
        vis = unpatchify(self.self_atten2(patchify(vis)), height, width)
        return ir, vis


class CrossAttentionStage(nn.Module):
    """``cross_atten1(t_ir, t_vis) + cross_atten2(t_vis, t_ir)`` on token sequences."""

    def __init__(self):
        super().__init__()
        self.cross_atten1 = CrossModule()
        self.cross_atten2 = CrossModule()

    def forward(self, ir_tokens: torch.Tensor, vis_tokens: torch.Tensor) -> torch.Tensor:
        return self.cross_atten1(ir_tokens, vis_tokens) + self.cross_atten2(vis_tokens, ir_tokens)


class CrossEncoder(nn.Module):
    """The cross encoder on windows ``[N, 128, 32, 32]`` of both modalities (docs/model.md#cross-encoder).

    ``shift=True`` rolls both maps by half a window around ``self_atten_block2``, as the
    released inference does. The roll only permutes tokens, so ``shift=False`` computes the
    same function up to rounding; training runs without it.
    """

    def __init__(self):
        super().__init__()
        self.self_atten_block1 = SelfAttentionStage()
        self.self_atten_block2 = SelfAttentionStage()
        self.cross_atten_block = CrossAttentionStage()

    def forward(self, ir: torch.Tensor, vis: torch.Tensor, shift: bool = True) -> torch.Tensor:
        height, width = ir.shape[-2:]
        ir, vis = self.self_atten_block1(ir, vis)
        if shift:
            ir = torch.roll(ir, shifts=(-SHIFT, -SHIFT), dims=(2, 3))
            vis = torch.roll(vis, shifts=(-SHIFT, -SHIFT), dims=(2, 3))
        ir, vis = self.self_atten_block2(ir, vis)
        if shift:
            ir = torch.roll(ir, shifts=(SHIFT, SHIFT), dims=(2, 3))
            vis = torch.roll(vis, shifts=(SHIFT, SHIFT), dims=(2, 3))
        fused = self.cross_atten_block(patchify(ir), patchify(vis))
        return unpatchify(fused, height, width)
