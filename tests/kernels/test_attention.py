"""``kernels.flash_attention``: the reversed-softmax attention, its launchers, the packed ops and
their registration, against fp64 (tests/utils.py says how)."""
import dataclasses

import pytest
import torch
from utils import (DEVICE, GPU, TOLERANCE, LaunchRecorder, assert_three_way, common_scale, nan_like,
                   relative_error)

from crossfuse_fast import kernels
from crossfuse_fast.kernels import flash_attention
from crossfuse_fast.kernels.flash_attention import Tiles, attention_bwd, attention_fwd, default_scale
from crossfuse_fast.reference import attention_ref

ATTENTION_SHAPES = [(1, 1, 1, 16), (3, 5, 17, 32), (2, 7, 50, 32), (1, 2, 256, 32), (1, 3, 50, 64),
                    (2, 1, 33, 128)]


@pytest.mark.parametrize("reverse", [True, False], ids=["reversed", "ordinary"])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_launchers_fp32(shape, reverse):
    torch.manual_seed(sum(shape))
    q, k, v, grad = (torch.randn(shape, device=DEVICE) for _ in range(4))
    scale = default_scale(shape[-1])
    out = nan_like(q)
    lse = attention_fwd(q, k, v, out, reverse=reverse, scale=scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    expected = attention_ref(q64, k64, v64, reverse=reverse)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    scores = (q64 @ k64.transpose(-2, -1)) * scale * (-1 if reverse else 1)
    lse_expected = torch.logsumexp(scores, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    assert relative_error(lse.view(shape[:3]), lse_expected) < TOLERANCE[torch.float32]
    dq, dk, dv = nan_like(q), nan_like(k), nan_like(v)
    attention_bwd(grad, q, k, v, out, lse, dq, dk, dv, reverse=reverse, scale=scale)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad.double())
    scale = common_scale(expected_grads)
    for name, got, want in zip("qkv", (dq, dk, dv), expected_grads):
        assert relative_error(got, want, scale) < 5 * TOLERANCE[torch.float32], f"d{name}"


@pytest.mark.parametrize("tiles", [Tiles(32, 64), Tiles(128, 32), Tiles(16, 16)],
                         ids=lambda t: f"{t.block_m}x{t.block_n}")
def test_attention_backward_at_other_tiles(tiles, monkeypatch):
    """The backward's tiles are a launch choice (``bench.attention_tiles`` sweeps them): every size
    gives the same gradients, tails included, and the kernels are launched at the tiles asked for."""
    torch.manual_seed(9)
    q, k, v, grad = (torch.randn(2, 3, 50, 32, device=DEVICE) for _ in range(4))
    out = torch.empty_like(q)
    lse = attention_fwd(q, k, v, out, reverse=True, scale=default_scale(32))
    results = []
    for choice in (None, tiles):
        grads = [nan_like(q) for _ in range(3)]
        attention_bwd(grad, q, k, v, out, lse, *grads, reverse=True, scale=default_scale(32), tiles=choice)
        results.append(grads)
    for name, got, want in zip("qkv", *results):
        assert relative_error(got, want, common_scale(results[0])) < 5 * TOLERANCE[torch.float32], f"d{name}"

    recorders = {name: LaunchRecorder(getattr(flash_attention, name))
                 for name in ("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(flash_attention, name, recorder)
    attention_bwd(grad, q, k, v, out, lse, *(nan_like(q) for _ in range(3)), reverse=True,
                  scale=default_scale(32), tiles=tiles)
    (dkdv_grid, dkdv_options), = recorders["_attention_bwd_dkdv_kernel"].launches
    (dq_grid, dq_options), = recorders["_attention_bwd_dq_kernel"].launches
    assert dkdv_grid == (-(-50 // tiles.block_n), 2 * 3) and dq_grid == (-(-50 // tiles.block_m), 2 * 3)
    for options in (dkdv_options, dq_options):
        assert (options["BLOCK_M"], options["BLOCK_N"], options["num_warps"], options["num_stages"]) == dataclasses.astuple(tiles)


def _three_way(dtype):
    torch.manual_seed(7)
    shape = (2, 3, 40, 32)
    q, k, v = (torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3))
    out = nan_like(q)
    attention_fwd(q, k, v, out, reverse=True, scale=default_scale(32))
    expected = attention_ref(q.double(), k.double(), v.double(), reverse=True)
    assert_three_way(out, expected, attention_ref(q, k, v, reverse=True), dtype)


def test_attention_fp16_three_way():
    _three_way(torch.float16)


@GPU
def test_attention_bf16_three_way():
    _three_way(torch.bfloat16)


def test_attention_reads_strided_views_and_writes_merged_heads(poisoned_allocations):
    """q, k, v as views of one packed projection; the output a view of ``[B, N, H * D]``."""
    torch.manual_seed(3)
    qkv = torch.randn(2, 19, 3 * 4 * 16, device=DEVICE, requires_grad=True)
    q, k, v = qkv.view(2, 19, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    out = kernels.attention(q, k, v, reverse=True)
    assert out.shape == (2, 4, 19, 16)
    assert out.transpose(1, 2).is_contiguous()  # merged heads: no copy needed to feed proj
    expected = attention_ref(q.double(), k.double(), v.double(), reverse=True)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, grad)
    (want,) = torch.autograd.grad(expected, qkv, grad.double())
    assert relative_error(got, want) < 5 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("tokens", [1, 17, 50])
def test_packed_self_and_cross_attention_against_twins(poisoned_allocations, tokens):
    torch.manual_seed(tokens)
    heads, channels = 4, 64
    qkv = torch.randn(3, tokens, 3 * channels, device=DEVICE, requires_grad=True)
    q = torch.randn(3, tokens, channels, device=DEVICE, requires_grad=True)
    kv = torch.randn(3, tokens, 2 * channels, device=DEVICE, requires_grad=True)
    cases = [((qkv,), kernels.self_attention, kernels.self_attention_torch, {"reverse": False}),
             ((q, kv), kernels.cross_attention, kernels.cross_attention_torch, {"reverse": True})]
    for inputs, triton_fn, torch_fn, options in cases:
        doubled = [x.detach().double().requires_grad_() for x in inputs]
        got = triton_fn(*inputs, heads, **options)
        want = torch_fn(*doubled, heads, **options)
        with torch.no_grad():  # inference calls the implementation without the op's dispatch
            assert torch.equal(triton_fn(*inputs, heads, **options), got)
        assert got.shape == want.shape == (3, tokens, channels)
        assert relative_error(got, want) < TOLERANCE[torch.float32]
        grad = torch.randn_like(got)
        wants = torch.autograd.grad(want, doubled, grad.double())
        for g, w in zip(torch.autograd.grad(got, inputs, grad), wants):
            assert relative_error(g, w, common_scale(wants)) < 5 * TOLERANCE[torch.float32]


def test_opcheck():
    torch.manual_seed(11)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    qkv = torch.randn(2, 5, 48, device=DEVICE, requires_grad=True)
    kv = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    q4 = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    cases = [
        (torch.ops.crossfuse.attention, (q4, q4.detach().clone().requires_grad_(),
                                         q4.detach().clone().requires_grad_(), True, 0.25)),
        (torch.ops.crossfuse.self_attention, (qkv, 1, False, 0.25)),
        (torch.ops.crossfuse.cross_attention, (x, kv, 1, True, 0.25)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
