"""Flash attention with CrossFuse's reversed softmax, forward and backward, as Triton kernels.

Math, for one head of ``q, k, v`` ``[N, D]``, ``sign = -1`` when ``reverse`` (the reversed softmax
of docs/model.md#blocks), else +1:

    S = sign * scale * q k^T          P = softmax(S) (rows)          o = P v

The forward runs the online softmax in fp32 over key blocks and saves, per query row, the
log-sum-exp in base 2 of the scaled scores, ``lse = log2(sum_j 2^(S_j log2 e))``; the
``N x N`` matrix never exists in memory. The backward recomputes ``P = 2^(S log2 e - lse)``:

    delta = rowsum(dO * o)            dV = P^T dO              dP = dO v^T
    dS = P * (dP - delta)             dQ = sign * scale * dS k     dK = sign * scale * dS^T q

one kernel for dK/dV (a program per key block, looping over query blocks) and one for dQ (a
program per query block), so no atomics and the result does not depend on scheduling.

Every operand is addressed by its own strides ``[batch, head, token]`` (the feature stride must
be 1), so the kernels read q, k and v straight out of the projection GEMMs' outputs and write o
with the heads already merged, ``[B, N, H * D]``. Design limit: head_dim 16..128 (a power of
two), any token count (tails masked), fp32 / fp16 / bf16 operands with fp32 accumulation;
fp32 dots use ``input_precision="ieee"`` so the interpreter and a GPU agree.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import merge_heads, split_heads, split_packed_heads
from .compiler_options import COMPILER_OPTIONS
from .registry import FusedOp


@triton.jit
def _program_head(heads, scale, IS_REVERSE: tl.constexpr):
    """``(pid_bh, batch, head, signed_scale, qk_scale)`` of this program (grid axis 1 is batch x heads).

    ``signed_scale`` is the softmax scale with the reversal's sign, pinned to fp32 (Inductor may
    pass fp64); ``qk_scale`` also folds in log2(e), so scores are in base 2:
    ``exp2(s) == exp(sign * scale * q.k)``.
    """
    pid_bh = tl.program_id(1)
    signed_scale = tl.cast(scale, tl.float32)
    if IS_REVERSE:
        signed_scale = -signed_scale
    return pid_bh, pid_bh // heads, pid_bh % heads, signed_scale, signed_scale * 1.4426950408889634


@triton.jit
def _load_rows(base, rows, stride, offs_d, mask):
    """A ``[len(rows), HEAD_DIM]`` tile of one head, zero past the last token."""
    return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask[:, None], other=0.0)


@triton.jit
def _store_rows(base, rows, stride, offs_d, mask, value):
    tl.store(base + rows[:, None] * stride + offs_d[None, :], value.to(base.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _recompute_tile(q, k, v, do, lse, delta, mask_m, mask_n, qk_scale, INPUT_PRECISION: tl.constexpr):
    """``P = 2^(S log2 e - lse)`` and ``dS = P * (dO v^T - delta)`` of one query x key tile."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    heads, tokens, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_REVERSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh, batch, head, _, qk_scale = _program_head(heads, scale, IS_REVERSE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < tokens
    q = _load_rows(Q + batch * stride_qb + head * stride_qh, offs_m, stride_qn, offs_d, mask_m)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, tokens, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < tokens
        k = _load_rows(k_base, cols, stride_kn, offs_d, mask_n)
        v = _load_rows(v_base, cols, stride_vn, offs_d, mask_n)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    _store_rows(O + batch * stride_ob + head * stride_oh, offs_m, stride_on, offs_d, mask_m, acc / l_i[:, None])
    tl.store(LSE + pid_bh * tokens + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    heads, tokens, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // heads
    head = pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < tokens
    o = _load_rows(O + batch * stride_ob + head * stride_oh, offs_m, stride_on, offs_d, mask_m).to(tl.float32)
    do = _load_rows(DO + batch * stride_dob + head * stride_doh, offs_m, stride_don, offs_d, mask_m).to(tl.float32)
    tl.store(DELTA + pid_bh * tokens + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    heads, tokens, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_REVERSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh, batch, head, signed_scale, qk_scale = _program_head(heads, scale, IS_REVERSE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < tokens
    k = _load_rows(K + batch * stride_kb + head * stride_kh, offs_n, stride_kn, offs_d, mask_n)
    v = _load_rows(V + batch * stride_vb + head * stride_vh, offs_n, stride_vn, offs_d, mask_n)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = Q + batch * stride_qb + head * stride_qh
    do_base = DO + batch * stride_dob + head * stride_doh
    for start_m in range(0, tokens, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < tokens
        q = _load_rows(q_base, rows, stride_qn, offs_d, mask_m)
        do = _load_rows(do_base, rows, stride_don, offs_d, mask_m)
        lse = tl.load(LSE + pid_bh * tokens + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + pid_bh * tokens + rows, mask=mask_m, other=0.0)
        p, ds = _recompute_tile(q, k, v, do, lse, delta, mask_m, mask_n, qk_scale, INPUT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=INPUT_PRECISION)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=INPUT_PRECISION)
    _store_rows(DK + batch * stride_dkb + head * stride_dkh, offs_n, stride_dkn, offs_d, mask_n, dk * signed_scale)
    _store_rows(DV + batch * stride_dvb + head * stride_dvh, offs_n, stride_dvn, offs_d, mask_n, dv)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    heads, tokens, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_REVERSE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh, batch, head, signed_scale, qk_scale = _program_head(heads, scale, IS_REVERSE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < tokens
    q = _load_rows(Q + batch * stride_qb + head * stride_qh, offs_m, stride_qn, offs_d, mask_m)
    do = _load_rows(DO + batch * stride_dob + head * stride_doh, offs_m, stride_don, offs_d, mask_m)
    lse = tl.load(LSE + pid_bh * tokens + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + pid_bh * tokens + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    for start_n in range(0, tokens, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < tokens
        k = _load_rows(k_base, cols, stride_kn, offs_d, mask_n)
        v = _load_rows(v_base, cols, stride_vn, offs_d, mask_n)
        _, ds = _recompute_tile(q, k, v, do, lse, delta, mask_m, mask_n, qk_scale, INPUT_PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    _store_rows(DQ + batch * stride_dqb + head * stride_dqh, offs_m, stride_dqn, offs_d, mask_m, dq * signed_scale)


@dataclass(frozen=True)
class Tiles:
    """Launch shape of an attention kernel: query rows and key columns per tile, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@functools.cache
def forward_tiles(head_dim: int, dtype: torch.dtype) -> Tiles:
    """Deterministic tiles (no autotuning, so runs repeat), chosen by ``python -m bench.attention_tiles``
    on a GPU (bench/NOTES.md): for the model's heads (32 wide) 128 x 64 with 4 warps, one stage for
    fp32 and three for 16-bit types; 64 x 64 or 64 x 32 for wider heads.
    """
    if head_dim <= 32:
        return Tiles(128, 64, 4, 1 if dtype == torch.float32 else 3)
    return Tiles(64, 64 if head_dim <= 64 else 32)


@functools.cache
def backward_tiles(head_dim: int, dtype: torch.dtype) -> Tiles:
    """Backward tiles (the same for the dK/dV and the dQ kernel): 64 x 64, 64 x 32 for wide heads.

    fp32 takes 8 warps and one stage, the choice that compiles for sm_90 without register spills
    (``python -m crossfuse_fast.kernels.compile_inspector`` shows each kernel's registers and
    stack; bench/NOTES.md has the tiles tried).
    """
    block_n = 64 if head_dim <= 64 else 32
    return Tiles(64, block_n, 8, 1) if dtype == torch.float32 else Tiles(64, block_n, 4, 3)


def _check_head_dim(head_dim: int, context: str = "") -> None:
    if head_dim < 16 or head_dim > 128 or head_dim & (head_dim - 1):
        raise ValueError(f"{context}head_dim must be a power of two in 16..128, got {head_dim}")


def _check(name: str, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride over head_dim")
    _check_head_dim(x.shape[-1], f"{name}: ")
    if reference is not None and (x.shape != reference.shape or x.dtype != reference.dtype):
        raise ValueError(f"{name} must match q in shape and dtype: {tuple(x.shape)} {x.dtype} vs "
                         f"{tuple(reference.shape)} {reference.dtype}")


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, reverse: bool,
                  scale: float, tiles: Tiles | None = None) -> torch.Tensor:
    """Write ``softmax(sign * scale * q k^T) v`` into ``out``; return the base-2 LSE ``[B*H, N]``.

    ``q, k, v, out``: ``[B, H, N, D]`` views with any batch/head/token strides. ``tiles``
    defaults to :func:`forward_tiles`.
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check(name, x, None if name == "q" else q)
    batch, heads, tokens, head_dim = q.shape
    return _launch_fwd(q, k, v, out, q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3], batch, heads,
                       tokens, head_dim, reverse, scale, tiles)


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, q_strides: tuple[int, ...], k_strides: tuple[int, ...],
                v_strides: tuple[int, ...], out_strides: tuple[int, ...], batch: int, heads: int, tokens: int,
                head_dim: int, reverse: bool, scale: float, tiles: Tiles | None = None) -> Tensor:
    """The forward launch on operands given as a tensor whose data starts at (batch 0, head 0, token 0)
    and ``[batch, head, token]`` strides: the packed ops pass their projections this way, with no
    per-head views to build (each costs host time that small batches feel)."""
    tiles = tiles or forward_tiles(head_dim, q.dtype)
    lse = torch.empty(batch * heads, tokens, device=q.device, dtype=torch.float32)
    _attention_fwd_kernel[(triton.cdiv(tokens, tiles.block_m), batch * heads)](
        q, k, v, out, lse, *q_strides, *k_strides, *v_strides, *out_strides, heads, tokens, scale,
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, IS_REVERSE=reverse,
        INPUT_PRECISION=_precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **COMPILER_OPTIONS)
    return lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *, reverse: bool,
                  scale: float, tiles: Tiles | None = None) -> None:
    """Write the gradients of :func:`attention_fwd` into ``dq, dk, dv`` (``[B, H, N, D]`` views).

    ``tiles`` defaults to :func:`backward_tiles`.
    """
    for name, x in (("grad_out", grad_out), ("dq", dq), ("dk", dk), ("dv", dv)):
        _check(name, x, q)
    batch, heads, tokens, head_dim = q.shape
    tiles = tiles or backward_tiles(head_dim, q.dtype)
    block_m, block_n = tiles.block_m, tiles.block_n
    delta = torch.empty_like(lse)
    _attention_bwd_preprocess_kernel[(triton.cdiv(tokens, block_m), batch * heads)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, tokens,
        HEAD_DIM=head_dim, BLOCK_M=block_m, **COMPILER_OPTIONS)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    common = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, IS_REVERSE=reverse,
                  INPUT_PRECISION=_precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                  **COMPILER_OPTIONS)
    _attention_bwd_dkdv_kernel[(triton.cdiv(tokens, block_n), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, *dk.stride()[:3], *dv.stride()[:3],
        heads, tokens, scale, **common)
    _attention_bwd_dq_kernel[(triton.cdiv(tokens, block_m), batch * heads)](
        q, k, v, grad_out, lse, delta, dq, *strides, *dq.stride()[:3], heads, tokens, scale, **common)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _head_strides(x: Tensor, head_dim: int) -> tuple[int, int, int]:
    """``[batch, head, token]`` strides of the heads packed in the last dimension of ``x``
    ``[B, N, ...]`` (a projection, or a merged-heads output): what :func:`_launch_fwd` takes."""
    return x.stride(0), head_dim, x.stride(1)


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _packed_head_dim(columns: int, parts: int, heads: int) -> int:
    if columns % (parts * heads):
        raise ValueError(f"{columns} features do not split into {parts} x {heads} heads")
    head_dim = columns // (parts * heads)
    _check_head_dim(head_dim)
    return head_dim


# ---- registered ops: the model's layouts, visible to torch.compile ----------------------------
# Each forward op returns the output and the base-2 log-sum-exp the backward needs; its backward
# is a second op. Heads are split and merged by strides inside the kernels, never by copies.

def _attention_impl(q: Tensor, k: Tensor, v: Tensor, reverse: bool, scale: float) -> tuple[Tensor, Tensor]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(name, x, None if name == "q" else q)
    batch, heads, tokens, head_dim = q.shape
    out = torch.empty(batch, tokens, heads * head_dim, device=q.device, dtype=q.dtype)
    lse = _launch_fwd(q, k, v, out, q.stride()[:3], k.stride()[:3], v.stride()[:3], _head_strides(out, head_dim),
                      batch, heads, tokens, head_dim, reverse, scale)
    return out, lse


def _attention_backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             reverse: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    heads = q.shape[1]
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    attention_bwd(split_heads(grad_out, heads), q, k, v, split_heads(out, heads), lse, dq, dk, dv,
                  reverse=reverse, scale=scale)
    return dq, dk, dv


_attention_backward = FusedOp(
    "attention_backward", _attention_backward_impl,
    lambda grad_out, q, k, v, out, lse, reverse, scale: tuple(
        torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v)))


def _attention_setup(ctx, inputs, output):
    q, k, v, ctx.reverse, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output)


def _attention_grads(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return *_attention_backward.op(grad_out.contiguous(), q, k, v, out, lse, ctx.reverse, ctx.scale), None, None


def _attention_fake(q, k, v, reverse, scale):
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty(batch, tokens, heads * head_dim), q.new_empty(batch * heads, tokens, dtype=torch.float32)


_attention = FusedOp("attention", _attention_impl, _attention_fake, backward=_attention_grads,
                     setup_context=_attention_setup)


def _self_attention_impl(qkv: Tensor, heads: int, reverse: bool, scale: float) -> tuple[Tensor, Tensor]:
    batch, tokens, columns = qkv.shape
    head_dim = _packed_head_dim(columns, 3, heads)
    channels = columns // 3
    out = torch.empty(batch, tokens, channels, device=qkv.device, dtype=qkv.dtype)
    strides = _head_strides(qkv, head_dim)
    lse = _launch_fwd(qkv, qkv.narrow(-1, channels, channels), qkv.narrow(-1, 2 * channels, channels), out,
                      strides, strides, strides, _head_strides(out, head_dim), batch, heads, tokens, head_dim,
                      reverse, scale)
    return out, lse


def _self_attention_backward_impl(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int,
                                  reverse: bool, scale: float) -> Tensor:
    grad_qkv = torch.empty_like(qkv)
    attention_bwd(split_heads(grad_out, heads), *split_packed_heads(qkv, 3, heads), split_heads(out, heads), lse,
                  *split_packed_heads(grad_qkv, 3, heads), reverse=reverse, scale=scale)
    return grad_qkv


_self_attention_backward = FusedOp(
    "self_attention_backward", _self_attention_backward_impl,
    lambda grad_out, qkv, out, lse, heads, reverse, scale: torch.empty_like(qkv))


def _self_attention_setup(ctx, inputs, output):
    qkv, ctx.heads, ctx.reverse, ctx.scale = inputs
    ctx.save_for_backward(qkv, *output)


def _self_attention_grads(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    grad_qkv = _self_attention_backward.op(grad_out.contiguous(), qkv, out, lse, ctx.heads, ctx.reverse, ctx.scale)
    return grad_qkv, None, None, None


def _self_attention_fake(qkv, heads, reverse, scale):
    batch, tokens, columns = qkv.shape
    return qkv.new_empty(batch, tokens, columns // 3), qkv.new_empty(batch * heads, tokens, dtype=torch.float32)


_self_attention = FusedOp("self_attention", _self_attention_impl, _self_attention_fake,
                          backward=_self_attention_grads, setup_context=_self_attention_setup)


def _cross_attention_impl(q: Tensor, kv: Tensor, heads: int, reverse: bool,
                          scale: float) -> tuple[Tensor, Tensor]:
    batch, tokens, channels = q.shape
    head_dim = _packed_head_dim(channels, 1, heads)
    if kv.shape != (batch, tokens, 2 * channels) or kv.dtype != q.dtype:
        raise ValueError(f"kv must be [{batch}, {tokens}, {2 * channels}] {q.dtype} for q {tuple(q.shape)}, "
                         f"got {tuple(kv.shape)} {kv.dtype}")
    out = torch.empty_like(q)
    kv_strides = _head_strides(kv, head_dim)
    lse = _launch_fwd(q, kv, kv.narrow(-1, channels, channels), out, _head_strides(q, head_dim), kv_strides,
                      kv_strides, _head_strides(out, head_dim), batch, heads, tokens, head_dim, reverse, scale)
    return out, lse


def _cross_attention_backward_impl(grad_out: Tensor, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, heads: int,
                                   reverse: bool, scale: float) -> tuple[Tensor, Tensor]:
    grad_q, grad_kv = torch.empty_like(q), torch.empty_like(kv)
    attention_bwd(split_heads(grad_out, heads), split_heads(q, heads), *split_packed_heads(kv, 2, heads),
                  split_heads(out, heads), lse, split_heads(grad_q, heads), *split_packed_heads(grad_kv, 2, heads),
                  reverse=reverse, scale=scale)
    return grad_q, grad_kv


_cross_attention_backward = FusedOp(
    "cross_attention_backward", _cross_attention_backward_impl,
    lambda grad_out, q, kv, out, lse, heads, reverse, scale: (torch.empty_like(q), torch.empty_like(kv)))


def _cross_attention_setup(ctx, inputs, output):
    q, kv, ctx.heads, ctx.reverse, ctx.scale = inputs
    ctx.save_for_backward(q, kv, *output)


def _cross_attention_grads(ctx, grad_out, grad_lse):
    q, kv, out, lse = ctx.saved_tensors
    grad_q, grad_kv = _cross_attention_backward.op(grad_out.contiguous(), q, kv, out, lse, ctx.heads, ctx.reverse,
                                                   ctx.scale)
    return grad_q, grad_kv, None, None, None


def _cross_attention_fake(q, kv, heads, reverse, scale):
    batch, tokens, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch * heads, tokens, dtype=torch.float32)


_cross_attention = FusedOp("cross_attention", _cross_attention_impl, _cross_attention_fake,
                           backward=_cross_attention_grads, setup_context=_cross_attention_setup)


# ---- public functions (Triton) and their PyTorch twins with the same signatures --------------

def attention(q: Tensor, k: Tensor, v: Tensor, *, reverse: bool, scale: float | None = None) -> Tensor:
    """``softmax(sign * scale * q k^T) v`` on ``[B, H, N, D]``; ``reverse=True``: sign -1.

    Returns ``[B, H, N, D]`` (a view of a merged-heads ``[B, N, H * D]`` buffer).
    """
    heads = q.shape[1]
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    out, _ = _attention(q, k, v, reverse, default_scale(q.shape[-1]) if scale is None else scale)
    return split_heads(out, heads)


def attention_torch(q: Tensor, k: Tensor, v: Tensor, *, reverse: bool, scale: float | None = None) -> Tensor:
    """PyTorch twin of :func:`attention`: the reversed softmax is SDPA on negated queries."""
    return F.scaled_dot_product_attention(-q if reverse else q, k, v, scale=scale)


def self_attention(qkv: Tensor, heads: int, *, reverse: bool = False, scale: float | None = None) -> Tensor:
    """Attention of a packed ``[B, N, 3 C]`` projection (q | k | v, heads inside each) -> ``[B, N, C]``."""
    qkv = qkv.contiguous()
    head_dim = qkv.shape[-1] // (3 * heads)
    return _self_attention(qkv, heads, reverse, default_scale(head_dim) if scale is None else scale)[0]


def self_attention_torch(qkv: Tensor, heads: int, *, reverse: bool = False, scale: float | None = None) -> Tensor:
    q, k, v = split_packed_heads(qkv.contiguous(), 3, heads)
    return merge_heads(attention_torch(q, k, v, reverse=reverse, scale=scale))


def cross_attention(q: Tensor, kv: Tensor, heads: int, *, reverse: bool = True, scale: float | None = None) -> Tensor:
    """Queries ``[B, N, C]`` against a packed ``[B, N, 2 C]`` key | value projection -> ``[B, N, C]``."""
    q, kv = q.contiguous(), kv.contiguous()
    head_dim = q.shape[-1] // heads
    return _cross_attention(q, kv, heads, reverse, default_scale(head_dim) if scale is None else scale)[0]


def cross_attention_torch(q: Tensor, kv: Tensor, heads: int, *, reverse: bool = True,
                          scale: float | None = None) -> Tensor:
    k, v = split_packed_heads(kv.contiguous(), 2, heads)
    return merge_heads(attention_torch(split_heads(q.contiguous(), heads), k, v, reverse=reverse, scale=scale))
