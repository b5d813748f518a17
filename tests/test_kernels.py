"""Triton kernels against their reference formulations: forward, every gradient, registration.

On a CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay
small. fp32 dots use ``input_precision="ieee"``, so these fp32 tolerances hold on a GPU too.
Low-precision cases use the three-way check: the kernel's error against the fp64 reference
must stay within twice PyTorch's own error in that dtype, plus a floor from the table.
"""
import pytest
import torch

from crossfuse_fast import kernels
from crossfuse_fast.fast import OPS, FastCrossEncoder, cross_module, self_module
from crossfuse_fast.kernels.attention import attention_bwd, attention_fwd, default_scale
from crossfuse_fast.reference import attention_ref
from crossfuse_fast.reference.transformer import CrossEncoder, CrossModule, SelfModule

# Largest allowed |kernel - fp64 reference| / max|reference|, per dtype.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
INTERPRETER_DTYPES = [torch.float32, torch.float16]  # Triton 3.9's interpreter computes bf16 dots wrongly
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs on the GPU machine only")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def _small_inputs():
    torch.manual_seed(11)
    return (torch.randn(2, 5, 16, device=DEVICE, requires_grad=True),
            torch.randn(2, 5, 48, device=DEVICE, requires_grad=True),
            torch.randn(2, 5, 32, device=DEVICE, requires_grad=True),
            torch.randn(16, device=DEVICE, requires_grad=True))


def test_opcheck_every_registered_op():
    x, qkv, kv, weight = _small_inputs()
    q4 = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    cases = [
        (torch.ops.crossfuse.attention, (q4, q4.detach().clone().requires_grad_(),
                                         q4.detach().clone().requires_grad_(), True, 0.25)),
        (torch.ops.crossfuse.self_attention, (qkv, 1, False, 0.25)),
        (torch.ops.crossfuse.cross_attention, (x, kv, 1, True, 0.25)),
        (torch.ops.crossfuse.layer_norm, (x, weight, weight.detach().clone().requires_grad_(), 1e-6)),
        (torch.ops.crossfuse.add_layer_norm, (x, x.detach().clone().requires_grad_(), weight,
                                              weight.detach().clone().requires_grad_(), 1e-6)),
        (torch.ops.crossfuse.bias_gelu, (x, weight)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(5)
    self_mod, cross_mod = SelfModule().to(DEVICE), CrossModule().to(DEVICE)
    xa, xb = torch.randn(2, 1, 9, 512, device=DEVICE).unbind(0)

    def block(xa, xb):
        ops = OPS["triton"]
        return cross_module(ops, cross_mod, self_module(ops, self_mod, xa), xb)

    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(xa, xb), block(xa, xb), rtol=1e-5, atol=1e-5)


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
