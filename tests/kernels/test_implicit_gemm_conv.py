"""``kernels.implicit_gemm_conv``: the implicit-GEMM convolution with its padding by address, on channel slices
of NHWC buffers, against the reference's padding and convolution in fp64."""
import pytest
import torch
from utils import DEVICE, INTERPRETER_DTYPES, TOLERANCE, assert_three_way, relative_error

from crossfuse_fast import kernels
from crossfuse_fast.kernels.implicit_gemm_conv import conv2d_into, conv2d_into_torch, conv2d_pool_into_torch, conv2d_torch
from crossfuse_fast.reference.autoencoder import ConvLayer

# (height, width, in, out, kernel, padding): odd sizes, one- and two-pixel maps (the padding repeats
# its reflection there), the model's channel counts and small ones, 1 x 1 kernels.
CASES = [(9, 13, 5, 7, 3, "reflect"), (17, 8, 96, 64, 3, "reflect"), (1, 1, 3, 4, 3, "reflect"),
         (2, 2, 32, 32, 3, "reflect"), (1, 5, 1, 32, 3, "reflect"), (4, 6, 64, 32, 3, "replicate"),
         (1, 2, 16, 8, 3, "replicate"), (9, 13, 32, 1, 1, "reflect")]


def _inputs(height, width, in_channels, out_channels, kernel, dtype=torch.float32, grad=False):
    torch.manual_seed(height * width + in_channels + out_channels)
    x = torch.randn(2, in_channels, height, width, device=DEVICE).to(dtype)
    weight = (torch.randn(out_channels, in_channels, kernel, kernel, device=DEVICE) / (in_channels * kernel)).to(dtype)
    bias = torch.randn(out_channels, device=DEVICE).to(dtype)
    return [t.requires_grad_(grad) for t in (x, weight, bias)]


def test_twin_is_the_reference_conv_layer():
    """The twin pads as ``ConvLayer`` does (repeated reflection for small maps), so the kernel is
    checked against the reference's own padding."""
    torch.manual_seed(1)
    for height, width in ((9, 13), (1, 1), (2, 3)):
        layer = ConvLayer(4, 6, 3)
        x = torch.randn(2, 4, height, width)
        with torch.no_grad():
            assert torch.equal(conv2d_torch(x, layer.conv2d[0].weight, layer.conv2d[0].bias), layer(x))


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}")
def test_conv2d_forward(poisoned_allocations, case, dtype):
    """Output against fp64, three-way per dtype, in channels_last."""
    *shape, padding = case
    x, weight, bias = _inputs(*shape, dtype=dtype)
    got = kernels.conv2d(x, weight, bias, padding_mode=padding)
    exact = conv2d_torch(x.double(), weight.double(), bias.double(), padding_mode=padding)
    assert got.shape == exact.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert_three_way(got, exact, conv2d_torch(x, weight, bias, padding_mode=padding), dtype)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}")
def test_conv2d_gradients(poisoned_allocations, case, dtype):
    """Input, weight and bias gradients through the registered op (the Triton backward: the
    padding's gradient folded by address, the weight gradient's split sums), three-way against
    fp64 and PyTorch in the same dtype."""
    *shape, padding = case
    inputs = _inputs(*shape, dtype=dtype, grad=True)
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    got = kernels.conv2d(*inputs, padding_mode=padding)
    want = conv2d_torch(*doubled, padding_mode=padding)
    low = conv2d_torch(*inputs, padding_mode=padding)
    upstream = torch.randn(got.shape, device=DEVICE)
    grads = [torch.autograd.grad(out, wrt, upstream.to(out.dtype))
             for out, wrt in ((got, inputs), (want, doubled), (low, inputs))]
    for name, g, w, lp in zip(("x", "weight", "bias"), *grads):
        assert g.shape == w.shape, name
        assert_three_way(g, w, lp, dtype, floor_factor=5, name=name)


def test_conv2d_reads_and_writes_channel_slices_of_nhwc_buffers(poisoned_allocations):
    """A dense block's layer: the input is channels 3..11 of one NHWC buffer, the output goes to
    channels 5..10 of another; every other channel of the output buffer is left as it was."""
    torch.manual_seed(2)
    source = torch.randn(2, 14, 9, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    target = torch.full((2, 16, 9, 7), float("nan"), device=DEVICE).contiguous(memory_format=torch.channels_last)
    x = source[:, 3:11]
    weight, bias = torch.randn(5, 8, 3, 3, device=DEVICE), torch.randn(5, device=DEVICE)
    with torch.no_grad():
        assert conv2d_into(x, weight, bias, target[:, 5:10]).data_ptr() == target[:, 5:10].data_ptr()
    exact = conv2d_torch(x.double(), weight.double(), bias.double())
    assert relative_error(target[:, 5:10], exact) < TOLERANCE[torch.float32]
    assert torch.isnan(target[:, :5]).all() and torch.isnan(target[:, 10:]).all()
    assert relative_error(kernels.conv2d(x, weight, bias), exact) < TOLERANCE[torch.float32]
    twin = torch.zeros_like(target)
    conv2d_into_torch(x, weight, bias, twin[:, 5:10])
    assert relative_error(twin[:, 5:10], exact) < TOLERANCE[torch.float32]


def test_conv2d_into_records_no_gradient():
    x, weight, bias = _inputs(4, 4, 3, 2, 3, grad=True)
    with pytest.raises(RuntimeError, match="records no gradient"):
        conv2d_into(x, weight, bias, torch.empty(2, 2, 4, 4))


def test_conv2d_names_bad_input():
    x, weight, bias = _inputs(4, 4, 3, 2, 3)
    with pytest.raises(ValueError, match="unknown padding_mode 'zeros'"):
        kernels.conv2d(x, weight, bias, padding_mode="zeros")
    with pytest.raises(ValueError, match=r"weight must be \[out, 3, k, k\] with k odd"):
        kernels.conv2d(x, weight[:, :2], bias)
    with pytest.raises(ValueError, match=r"weight must be \[out, 3, k, k\] with k odd"):
        kernels.conv2d(x, torch.randn(2, 3, 2, 2), bias)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        kernels.conv2d(x, weight, bias[:1])
    with pytest.raises(ValueError, match="share a dtype"):
        kernels.conv2d(x, weight.half(), bias)
    with torch.no_grad(), pytest.raises(ValueError, match=r"out must be \[2, 2, 4, 4\]"):
        conv2d_into(x, weight, bias, torch.empty(2, 3, 4, 4))


def test_opcheck():
    x, weight, bias = _inputs(5, 3, 4, 3, 3, grad=True)
    torch.library.opcheck(torch.ops.crossfuse.conv2d, (x, weight, bias, "reflect", False))
    torch.library.opcheck(torch.ops.crossfuse.conv2d, (x, weight, None, "replicate", False))
    buffer = torch.zeros(2, 7, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.crossfuse.conv2d_into,
                          (x.detach(), weight.detach(), bias.detach(), buffer[:, 4:7], "reflect", False))


def test_compile_fullgraph_matches_eager():
    """Forward and backward under ``torch.compile(fullgraph=True)``."""
    inputs = _inputs(6, 5, 4, 3, 3, grad=True)
    compiled = torch.compile(lambda x, w, b: kernels.conv2d(x, w, b), fullgraph=True)
    got, want = compiled(*inputs), kernels.conv2d(*inputs)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("height,width,in_channels,out_channels", [(6, 8, 3, 5), (2, 2, 32, 64), (10, 4, 1, 32),
                                                                   (4, 6, 96, 64), (9, 13, 1, 32), (17, 8, 3, 5),
                                                                   (3, 2, 2, 3)])
def test_conv2d_pool_into(poisoned_allocations, height, width, in_channels, out_channels, dtype):
    """The convolution with its 2 x 2 max-pool in the epilogue: the pooled map written into a channel
    slice of a wider buffer (a dense block's first channels) and the full map beside it, three-way
    against fp64; the other channels of the buffer are left as they were. Odd sides: the pool floors
    and the full map's last row and column are written too."""
    x, weight, bias = _inputs(height, width, in_channels, out_channels, 3, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    buffer = torch.full((2, out_channels + 7, height // 2, width // 2), float("nan"), device=DEVICE, dtype=dtype)
    buffer = buffer.contiguous(memory_format=torch.channels_last)
    full = torch.full((2, out_channels, height, width), float("nan"), device=DEVICE, dtype=dtype)
    with torch.no_grad():
        kernels.conv2d_pool_into(x, weight, bias, buffer[:, :out_channels], full)
    exact = conv2d_torch(x.double(), weight.double(), bias.double())
    plain = conv2d_torch(x, weight, bias)
    assert_three_way(full, exact, plain, dtype, name="full")
    pool = torch.nn.functional.max_pool2d
    assert_three_way(buffer[:, :out_channels], pool(exact, 2), pool(plain.float(), 2).to(dtype), dtype, name="pooled")
    assert torch.isnan(buffer[:, out_channels:]).all()
    twin = torch.zeros_like(buffer[:, :out_channels])
    conv2d_pool_into_torch(x, weight, bias, twin)
    assert_three_way(twin, pool(exact, 2), pool(plain.float(), 2).to(dtype), dtype, name="twin")


def test_conv2d_pool_into_names_one_pixel_sides_and_records_no_gradient():
    x, weight, bias = _inputs(1, 4, 3, 2, 3)
    with torch.no_grad(), pytest.raises(ValueError, match="sides of 2 or more, got 1 x 4"):
        kernels.conv2d_pool_into(x, weight, bias, torch.empty(2, 2, 0, 2))
    x, weight, bias = _inputs(4, 4, 3, 2, 3, grad=True)
    with pytest.raises(RuntimeError, match="records no gradient"):
        kernels.conv2d_pool_into(x, weight, bias, torch.empty(2, 2, 2, 2))


def test_opcheck_pooled():
    x, weight, bias = (t.detach() for t in _inputs(4, 6, 4, 3, 3))
    buffer = torch.zeros(2, 9, 2, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    full = torch.zeros(2, 3, 4, 6, device=DEVICE)
    torch.library.opcheck(torch.ops.crossfuse.conv2d_pool_into,
                          (x, weight, bias, buffer[:, 2:5], full, "reflect", False))
    torch.library.opcheck(torch.ops.crossfuse.conv2d_pool_into, (x, weight, None, buffer[:, 2:5], None, "replicate",
                                                                  False))
