"""Triton kernels against their reference formulations: forward, every gradient, registration.

On a CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
small. fp32 dots use ``input_precision="ieee"``, so these fp32 tolerances hold on a GPU too.
Low-precision cases use the three-way check: the kernel's error against the fp64 reference
must stay within twice PyTorch's own error in that dtype, plus a floor from the table.
"""
import copy
import dataclasses
import importlib

import pytest
import torch

from crossfuse_fast import kernels
from crossfuse_fast.fast import FastCrossEncoder
from crossfuse_fast.kernels.attention import Tiles, attention_bwd, attention_fwd, default_scale
from crossfuse_fast.kernels.linear_gelu import GemmTiles, linear_gelu_fwd
from crossfuse_fast.kernels.windows import WindowGrid, map_to_tokens, tokens_to_map
from crossfuse_fast.reference import attention_ref
from crossfuse_fast.reference.functional import from_windows, patchify, to_windows, unpatchify
from crossfuse_fast.reference.fusion import FusionNet
from crossfuse_fast.reference.transformer import CrossEncoder

# Largest allowed |kernel - fp64 reference| / max|reference|, per dtype.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
INTERPRETER_DTYPES = [torch.float32, torch.float16]  # Triton 3.9's interpreter computes bf16 dots wrongly
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs on the GPU machine only")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The module, not the function of the same name that the kernels package exports.
attention_module = importlib.import_module("crossfuse_fast.kernels.attention")


def relative_error(got: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> float:
    """max |got - expected| over max |expected| (or over ``scale``, shared by related tensors)."""
    if scale is None:
        scale = expected.double().abs().max().item()
    return (got.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


def common_scale(tensors) -> float:
    """The largest magnitude among related gradients: one of them may be exactly zero in theory
    (dq with a single key, whose softmax is constant), so each is judged against all of them."""
    return max(t.double().abs().max().item() for t in tensors if t is not None)


ATTENTION_SHAPES = [(1, 1, 1, 16), (3, 5, 17, 32), (2, 7, 50, 32), (1, 2, 256, 32), (1, 3, 50, 64),
                    (2, 1, 33, 128)]


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


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

    recorders = {name: LaunchRecorder(getattr(attention_module, name))
                 for name in ("_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(attention_module, name, recorder)
    attention_bwd(grad, q, k, v, out, lse, *(nan_like(q) for _ in range(3)), reverse=True,
                  scale=default_scale(32), tiles=tiles)
    (dkdv_grid, dkdv_options), = recorders["_attention_bwd_dkdv_kernel"].launches
    (dq_grid, dq_options), = recorders["_attention_bwd_dq_kernel"].launches
    assert dkdv_grid == (-(-50 // tiles.block_n), 2 * 3) and dq_grid == (-(-50 // tiles.block_m), 2 * 3)
    for options in (dkdv_options, dq_options):
        assert (options["BLOCK_M"], options["BLOCK_N"], options["num_warps"], options["num_stages"]) == dataclasses.astuple(tiles)


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: records each launch's grid and keyword options, then
    launches the kernel."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **options):
            self.launches.append((grid, options))
            return launch(*args, **options)
        return record


def _three_way(dtype):
    torch.manual_seed(7)
    shape = (2, 3, 40, 32)
    q, k, v = (torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3))
    out = nan_like(q)
    attention_fwd(q, k, v, out, reverse=True, scale=default_scale(32))
    expected = attention_ref(q.double(), k.double(), v.double(), reverse=True)
    torch_error = relative_error(attention_ref(q, k, v, reverse=True), expected)
    assert relative_error(out, expected) <= 2 * torch_error + TOLERANCE[dtype]


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


ELEMENTWISE_OPS = {
    "layer_norm": (lambda x, r, w, b: (kernels.layer_norm(x, w, b, 1e-6),),
                   lambda x, r, w, b: (kernels.layer_norm_torch(x, w, b, 1e-6),)),
    "add_layer_norm": (lambda x, r, w, b: kernels.add_layer_norm(x, r, w, b, 1e-6),
                       lambda x, r, w, b: kernels.add_layer_norm_torch(x, r, w, b, 1e-6)),
    "bias_gelu": (lambda x, r, w, b: (kernels.bias_gelu(x, b),),
                  lambda x, r, w, b: (kernels.bias_gelu_torch(x, b),)),
}


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols", [(1, 512), (37, 512), (5, 100)])
@pytest.mark.parametrize("op", ELEMENTWISE_OPS)
def test_layer_norms_and_bias_gelu(poisoned_allocations, op, rows, cols, dtype):
    """Outputs and every gradient (inputs, weight, bias) against fp64, three-way per dtype."""
    torch.manual_seed(rows + cols)
    inputs = [torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()
              for shape in ((rows, cols), (rows, cols), (cols,), (cols,))]
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    triton_fn, torch_fn = ELEMENTWISE_OPS[op]
    got, want, low = triton_fn(*inputs), torch_fn(*doubled), torch_fn(*inputs)
    with torch.no_grad():
        for direct, through_op in zip(triton_fn(*inputs), got):
            assert torch.equal(direct, through_op)
    for g, w, lp in zip(got, want, low):
        assert relative_error(g, w) <= 2 * relative_error(lp, w) + TOLERANCE[dtype]
    upstream = [torch.randn(rows, cols, device=DEVICE).to(dtype) for _ in got]

    def grads(outputs, wrt):
        loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream))
        return torch.autograd.grad(loss, wrt, allow_unused=True)

    for g, w, lp in zip(grads(got, inputs), grads(want, doubled), grads(low, inputs)):
        assert (g is None) == (w is None)
        if g is not None:
            assert relative_error(g, w) <= 2 * relative_error(lp, w) + 5 * TOLERANCE[dtype]


@pytest.mark.parametrize("height,width", [(32, 32), (40, 70), (5, 70), (1, 1), (64, 33)])
def test_window_twins_are_the_reference_windows_and_patches(height, width):
    """``map_to_tokens`` / ``tokens_to_map`` are SPEC 2.1's pad, windows and patches (the kernels'
    addressing is checked against them below), including pads longer than the map."""
    x = torch.randn(2, 3, height, width)
    tokens = map_to_tokens(x, (32, 32))
    assert torch.equal(tokens, patchify(to_windows(x)))
    assert tokens.shape == WindowGrid.of(x.shape, (32, 32)).token_shape
    assert torch.equal(tokens_to_map(tokens, height, width, (32, 32)),
                       from_windows(unpatchify(tokens, 32, 32), 2, height, width))


# (map shape, window): exact windows, a crop, pads longer than the side (repeated mirroring),
# one-pixel sides, a non-square window.
MAP_CASES = [((1, 4, 6, 4), (6, 4)), ((2, 3, 5, 7), (4, 4)), ((1, 2, 3, 2), (8, 2)), ((1, 2, 1, 3), (2, 4))]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,window", MAP_CASES, ids=lambda c: "x".join(map(str, c)))
def test_layer_norms_at_the_map_ends(poisoned_allocations, shape, window, channels_last):
    """The encoder's first LayerNorm (reading windows of patches by address) and last (adding the
    other module's output and writing the map by address): outputs and every gradient against fp64
    twins. Poisoned buffers catch a missed pixel; the padded windows must crop and fold back."""
    torch.manual_seed(sum(shape) + sum(window))
    height, width = shape[-2:]
    features = shape[1] * 4
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE).to(memory_format=memory_format).requires_grad_()
    token_shape = WindowGrid.of(shape, window).token_shape
    residual, plus = (torch.randn(token_shape, device=DEVICE, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(features, device=DEVICE, requires_grad=True) for _ in range(2))
    inputs = (x, residual, plus, weight, bias)
    doubled = [t.detach().double().requires_grad_() for t in inputs]

    def first_and_last(layer_norm_from_map, add_layer_norm_to_map, x, residual, plus, weight, bias):
        normed, tokens = layer_norm_from_map(x, weight, bias, 1e-6, window)
        out = add_layer_norm_to_map(normed, residual, plus, weight, bias, 1e-6, height, width, window)
        return normed, tokens, out

    got = first_and_last(kernels.layer_norm_from_map, kernels.add_layer_norm_to_map, *inputs)
    want = first_and_last(kernels.layer_norm_from_map_torch, kernels.add_layer_norm_to_map_torch, *doubled)
    with torch.no_grad():
        direct = first_and_last(kernels.layer_norm_from_map, kernels.add_layer_norm_to_map, *inputs)
    for name, g, w, d in zip(("normed", "tokens", "map"), got, want, direct):
        assert g.shape == w.shape, name
        assert torch.equal(d, g), name
        assert relative_error(g, w) < TOLERANCE[torch.float32], name
    upstream = [torch.randn(w.shape, device=DEVICE) for w in want]
    have = torch.autograd.grad(sum((g * u).sum() for g, u in zip(got, upstream)), inputs)
    expected = torch.autograd.grad(sum((w * u.double()).sum() for w, u in zip(want, upstream)), doubled)
    for name, h, w in zip(("x", "residual", "plus", "weight", "bias"), have, expected):
        assert relative_error(h, w) < 5 * TOLERANCE[torch.float32], name


def test_norm_and_gelu_ops_name_mismatched_operands():
    """The kernels index every operand by the same offsets, so a short one must be refused, not read past."""
    x, short = torch.randn(3, 8, device=DEVICE), torch.randn(6, device=DEVICE)
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        kernels.layer_norm(x, short, ones, 1e-6)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        kernels.add_layer_norm(x, x, ones, short, 1e-6)
    with pytest.raises(ValueError, match=r"residual must have the shape of x, \(3, 8\)"):
        kernels.add_layer_norm(x, x[:2], ones, ones, 1e-6)
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.bias_gelu(x, short)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.layer_norm_from_map(torch.randn(1, 2, 4, 4, device=DEVICE), ones[:6], ones[:6], 1e-6, (4, 4))
    tokens = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="plus must have the shape of x"):
        kernels.add_layer_norm_to_map(tokens, tokens, tokens[:, :2], ones, ones, 1e-6, 4, 4, (4, 4))


def test_map_ops_name_a_bad_geometry():
    weight = torch.ones(8)
    with pytest.raises(ValueError, match="multiples of 2"):
        kernels.layer_norm_from_map(torch.randn(1, 2, 4, 4), weight, weight, 1e-6, (3, 4))
    with pytest.raises(ValueError, match="feature map"):
        kernels.layer_norm_from_map(torch.randn(2, 4, 4), weight, weight, 1e-6, (4, 4))
    tokens = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="do not cut a 8 x 4 map"):
        kernels.add_layer_norm_to_map(tokens, tokens, tokens, weight, weight, 1e-6, 8, 4, (4, 4))


@pytest.mark.parametrize("rows,depth,cols", [(1, 16, 8), (37, 80, 96), (300, 100, 200)])
def test_linear_gelu_launcher_fp32(poisoned_allocations, rows, depth, cols):
    """The GEMM with bias + GELU epilogue, and its saved pre-activation, against fp64; tails in every
    dimension, several row and column blocks."""
    torch.manual_seed(rows + cols)
    x, weight, bias = (torch.randn(*shape, device=DEVICE) for shape in ((2, rows, depth), (cols, depth), (cols,)))
    tiles = GemmTiles(block_m=64, block_n=64, block_k=32, group_m=2, num_warps=4, num_stages=2)
    y, pre = linear_gelu_fwd(x, weight, bias, save_pre=True, tiles=tiles)
    pre_expected = x.double() @ weight.double().t()
    assert relative_error(pre, pre_expected) < TOLERANCE[torch.float32]
    assert relative_error(y, torch.nn.functional.gelu(pre_expected + bias.double())) < TOLERANCE[torch.float32]
    with pytest.raises(ValueError, match="do not make x @ weight.T"):
        linear_gelu_fwd(x, weight.t(), bias, save_pre=False)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
def test_linear_gelu_forward_and_gradients(poisoned_allocations, dtype):
    """The public op (fused GEMM in 16 bits, cuBLAS + bias_gelu in fp32): output and the gradients of
    x, weight and bias, three-way against fp64 and PyTorch in the same dtype."""
    torch.manual_seed(21)
    inputs = [(torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_()
              for shape, scale in (((3, 45, 64), 1.0), ((136, 64), 0.125), ((136,), 1.0))]
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    got, want, low = (kernels.linear_gelu(*inputs), kernels.linear_gelu_torch(*doubled),
                      kernels.linear_gelu_torch(*inputs))
    with torch.no_grad():
        assert torch.equal(kernels.linear_gelu(*inputs), got)
    assert relative_error(got, want) <= 2 * relative_error(low, want) + TOLERANCE[dtype]
    upstream = torch.randn(got.shape, device=DEVICE)
    grads = [torch.autograd.grad(out, wrt, upstream.to(out.dtype))
             for out, wrt in ((got, inputs), (want, doubled), (low, inputs))]
    for name, g, w, lp in zip(("x", "weight", "bias"), *grads):
        assert relative_error(g, w) <= 2 * relative_error(lp, w) + 5 * TOLERANCE[dtype], name


def test_linear_gelu_op_pre_activation_output_has_gradients():
    """The registered op also returns ``x W^T`` (saved for the backward): using it downstream adds
    its gradient to x's and W's."""
    torch.manual_seed(4)
    inputs = [torch.randn(*shape, device=DEVICE).half().requires_grad_() for shape in ((5, 16), (8, 16), (8,))]
    y, pre = torch.ops.crossfuse.linear_gelu(*inputs, True)
    got = torch.autograd.grad(y.float().sum() + (pre.float() ** 2).sum(), inputs)
    x, weight, bias = (t.detach().double().requires_grad_() for t in inputs)
    pre64 = x @ weight.t()
    want = torch.autograd.grad(torch.nn.functional.gelu(pre64 + bias).sum() + (pre64 ** 2).sum(), (x, weight, bias))
    for name, g, w in zip(("x", "weight", "bias"), got, want):
        assert relative_error(g, w) < TOLERANCE[torch.float16], name


def _small_inputs():
    torch.manual_seed(11)
    return (torch.randn(2, 5, 16, device=DEVICE, requires_grad=True),
            torch.randn(2, 5, 48, device=DEVICE, requires_grad=True),
            torch.randn(2, 5, 32, device=DEVICE, requires_grad=True),
            torch.randn(16, device=DEVICE, requires_grad=True))


def test_opcheck_every_registered_op():
    x, qkv, kv, weight = _small_inputs()
    q4 = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    tokens = [torch.randn(2, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3)]  # a 7 x 3 map's
    cases = [
        (torch.ops.crossfuse.attention, (q4, q4.detach().clone().requires_grad_(),
                                         q4.detach().clone().requires_grad_(), True, 0.25)),
        (torch.ops.crossfuse.self_attention, (qkv, 1, False, 0.25)),
        (torch.ops.crossfuse.cross_attention, (x, kv, 1, True, 0.25)),
        (torch.ops.crossfuse.layer_norm, (x, weight, weight.detach().clone().requires_grad_(), 1e-6)),
        (torch.ops.crossfuse.add_layer_norm, (x, x.detach().clone().requires_grad_(), weight,
                                              weight.detach().clone().requires_grad_(), 1e-6)),
        (torch.ops.crossfuse.bias_gelu, (x, weight)),
        (torch.ops.crossfuse.linear_gelu, (x.half(), *(torch.randn(*shape, device=DEVICE, dtype=torch.half,
                                                                    requires_grad=True) for shape in ((24, 16), (24,))),
                                           True)),
        (torch.ops.crossfuse.layer_norm_from_map, (torch.randn(1, 4, 5, 3, device=DEVICE, requires_grad=True),
                                                   weight, weight.detach().clone().requires_grad_(), 1e-6, 4, 4)),
        (torch.ops.crossfuse.add_layer_norm_to_map, (*tokens, weight, weight.detach().clone().requires_grad_(),
                                                     1e-6, 7, 3, 4, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    """The whole fast encoder on maps (every registered op, both map ends) under one graph."""
    torch.manual_seed(5)
    fast = FastCrossEncoder(CrossEncoder().to(DEVICE), "triton")
    ir, vis = (torch.randn(1, 128, 3, 5, device=DEVICE) for _ in range(2))

    def encode(ir, vis):
        return fast._run(ir, vis, (4, 4))

    compiled = torch.compile(encode, fullgraph=True)
    torch.testing.assert_close(compiled(ir, vis), encode(ir, vis), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_fused_fc1_in_16_bits():
    """The fused GEMM + GELU op (16-bit only) under ``torch.compile(fullgraph=True)``, with its backward."""
    torch.manual_seed(6)
    x = torch.randn(2, 9, 64, device=DEVICE).half().requires_grad_()
    weight = (torch.randn(96, 64, device=DEVICE) * 0.125).half().requires_grad_()
    bias = torch.randn(96, device=DEVICE).half().requires_grad_()
    compiled = torch.compile(kernels.linear_gelu, fullgraph=True)
    got, want = compiled(x, weight, bias), kernels.linear_gelu(x, weight, bias)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    inputs = (x, weight, bias)
    for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend,window", [("torch", (32, 32)), ("triton", (10, 6))])
def test_fast_cross_encoder_equals_reference(backend, window):
    """Self blocks, shift, cross blocks: the fused path against the reference, forward and gradients."""
    torch.manual_seed(13)
    reference = CrossEncoder().to(DEVICE)
    fast = FastCrossEncoder(reference, backend)
    ir, vis = (torch.randn(2, 128, *window, device=DEVICE, requires_grad=True) for _ in range(2))
    expected = reference(ir, vis, shift=True)
    got = fast(ir, vis, shift=True)
    assert relative_error(got, expected) < 2e-6
    names, parameters = zip(*[(n, p) for n, p in reference.named_parameters()])
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (ir, vis, *parameters), grad, allow_unused=True)
    have = torch.autograd.grad(got, (ir, vis, *parameters), grad, allow_unused=True)
    # k_linear's bias shifts every score of a row equally, so softmax makes its true gradient
    # zero: compare against the scale of all gradients, not each tensor's own.
    scale = max(w.abs().max().item() for w in want if w is not None)
    for name, h, w in zip(("ir", "vis", *names), have, want):
        assert (h is None) == (w is None), name
        if w is not None:
            assert (h - w).abs().max().item() / scale < 2e-5, name


def test_fast_fuse_deep_equals_fusion_net_windows():
    """Whole deep maps (SPEC 2.1: padded 32 x 32 windows, put back, cropped) through the fast encoder's
    map ends against ``FusionNet.fuse_deep``, forward and input gradients (PyTorch twins; the Triton
    ends equal the twins by the map-end test above)."""
    torch.manual_seed(17)
    net = FusionNet().to(DEVICE)
    fast = FastCrossEncoder(net.cross_atten_block, "torch")
    ir, vis = (torch.randn(1, 128, 33, 20, device=DEVICE, requires_grad=True) for _ in range(2))
    expected = net.fuse_deep(ir, vis)
    got = fast.fuse_deep(ir, vis)
    assert got.shape == expected.shape == (1, 128, 33, 20)
    assert relative_error(got, expected) < 2e-6
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (ir, vis), grad)
    have = torch.autograd.grad(got, (ir, vis), grad)
    for name, h, w in zip(("ir", "vis"), have, want):
        assert relative_error(h, w) < 2e-5, name


def test_fast_encoder_merges_k_and_v_weights_once_in_inference(monkeypatch):
    """The cross blocks' merged k | v weights are concatenated once while no gradient is recorded
    (and again when a weight changes), on every call while one is (so it reaches the weights)."""
    fast_module = importlib.import_module("crossfuse_fast.fast")
    merges = []
    merged_kv_weights = fast_module.merged_kv_weights
    monkeypatch.setattr(fast_module, "merged_kv_weights", lambda attn: merges.append(attn) or merged_kv_weights(attn))
    torch.manual_seed(19)
    reference = CrossEncoder().to(DEVICE)
    fast = FastCrossEncoder(reference, "torch")
    ir, vis = (torch.randn(1, 128, 8, 8, device=DEVICE) for _ in range(2))
    with torch.no_grad():
        for _ in range(3):
            fast(ir, vis)
        assert len(merges) == 2  # one cross block in each of the two cross modules
        reference.cross_atten_block.cross_atten2.blocks[0].attn.v_linear.weight.mul_(-1)
        got = fast(ir, vis)
        assert len(merges) == 3
        assert relative_error(got, reference(ir, vis)) < 2e-6
    fast(ir, vis)
    fast(ir, vis)
    assert len(merges) == 7


def test_fast_encoder_names_bad_input():
    fast = FastCrossEncoder(CrossEncoder())
    with pytest.raises(ValueError, match=r"deep features \[batch, 128"):
        fast(torch.randn(1, 64, 32, 32), torch.randn(1, 64, 32, 32))
    with pytest.raises(ValueError, match="differ in shape"):
        fast.fuse_deep(torch.randn(1, 128, 32, 32), torch.randn(1, 128, 32, 30))
    with pytest.raises(ValueError, match="multiples of 2"):
        fast(torch.randn(1, 128, 5, 4), torch.randn(1, 128, 5, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        FastCrossEncoder(CrossEncoder(), "cuda")


def test_fast_cross_encoder_fp16_three_way():
    """In fp16 the MLP's fc1 runs as the fused GEMM + GELU kernel: the whole encoder's output and
    input gradients stay within twice the reference's own fp16 error (against fp64), plus the floor."""
    torch.manual_seed(19)
    reference = CrossEncoder().to(DEVICE)
    ir, vis = (torch.randn(2, 128, 6, 4, device=DEVICE) for _ in range(2))
    grad = torch.randn(2, 128, 6, 4, device=DEVICE)

    def run(encoder, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (ir, vis)]
        out = encoder(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad.to(dtype)))

    want = run(copy.deepcopy(reference).double(), torch.float64)
    half = copy.deepcopy(reference).half()
    low, got = run(half, torch.float16), run(FastCrossEncoder(half, "triton"), torch.float16)
    for name, g, w, lp in zip(("output", "ir", "vis"), got, want, low):
        assert relative_error(g, w) <= 2 * relative_error(lp, w) + TOLERANCE[torch.float16], name
