"""``kernels.dense_encoder``: the encoder with each dense block in one buffer, forward and every
gradient, against the reference's convolutions, concatenations and pools in fp64."""
import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, assert_three_way

from crossfuse_fast import kernels
from crossfuse_fast.kernels.dense_encoder import max_pool_bwd


def _small_encoder(dtype, seed, channels=(1, 4, 3, 6)):
    """The released layout with fewer channels (first conv, growth, block output), for the interpreter's
    sake: ``[weights], [biases]`` of conv1 and two blocks of three dense layers and an adjust conv."""
    image, first, growth, out = channels
    torch.manual_seed(seed)
    shapes = [(first, image)]
    for block_in in (first, out):
        shapes += [(growth, block_in + k * growth) for k in range(3)] + [(out, block_in + 3 * growth)]
    weights = [(torch.randn(o, i, 3, 3, device=DEVICE) / (3 * i ** 0.5)).to(dtype).requires_grad_() for o, i in shapes]
    biases = [(0.1 * torch.randn(o, device=DEVICE)).to(dtype).requires_grad_() for o, _ in shapes]
    return weights, biases


@pytest.mark.parametrize("height,width,dtype", [(17, 13, torch.float32), (9, 11, torch.float16), (8, 8, torch.float32)],
                         ids=["17x13-float32", "9x11-float16", "8x8-float32"])
def test_dense_encoder_forward_and_gradients(poisoned_allocations, monkeypatch, height, width, dtype):
    """Both outputs and the gradients of the image, every weight and every bias, three-way against
    fp64 and the twin in the same dtype; odd sides, where the pools floor; no ``torch.cat`` forward
    or backward (the blocks live in their buffers); every element written (NaN-poisoned buffers)."""
    weights, biases = _small_encoder(dtype, height * width)
    x = torch.rand(2, 1, height, width, device=DEVICE).to(dtype).requires_grad_()
    inputs = [x, *weights, *biases]
    doubled = [t.detach().double().requires_grad_() for t in inputs]
    layers = len(weights)
    want = kernels.dense_encoder_torch(doubled[0], doubled[1:1 + layers], doubled[1 + layers:])
    low = kernels.dense_encoder_torch(x, weights, biases)
    upstream = [torch.randn(w.shape, device=DEVICE, dtype=torch.float64) for w in want]
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *args, **kwargs: pytest.fail("torch.cat ran"))
    got = kernels.dense_encoder(x, weights, biases)
    grads = torch.autograd.grad(got, inputs, [u.to(dtype) for u in upstream])
    monkeypatch.setattr(torch, "cat", cat)
    for name, g, w, lp in zip(("shallow", "deep"), got, want, low):
        assert g.shape == w.shape and g.is_contiguous(memory_format=torch.channels_last), name
        assert_three_way(g, w, lp, dtype, name=name)
    wanted = torch.autograd.grad(want, doubled, upstream)
    plain = torch.autograd.grad(low, inputs, [u.to(dtype) for u in upstream])
    names = ["x"] + [f"weight {i}" for i in range(layers)] + [f"bias {i}" for i in range(layers)]
    for name, g, w, lp in zip(names, grads, wanted, plain):
        assert g.shape == w.shape, name
        assert_three_way(g, w, lp, dtype, floor_factor=5, name=name)


def test_max_pool_gradient_goes_to_the_first_maximum():
    """Ties (integer maps), a NaN and odd sides: the gradient lands where PyTorch's max-pool sends it."""
    torch.manual_seed(7)
    full = torch.randint(0, 3, (2, 5, 7, 9), device=DEVICE).float()
    full[0, 1, 2, 3] = float("nan")
    full = full.contiguous(memory_format=torch.channels_last).requires_grad_()
    pooled = F.max_pool2d(full, 2)
    upstream = torch.randn(pooled.shape, device=DEVICE)
    (want,) = torch.autograd.grad(pooled, full, upstream)
    extra = torch.randn(full.shape, device=DEVICE)
    assert torch.equal(max_pool_bwd(full.detach(), upstream), want)
    assert torch.equal(max_pool_bwd(full.detach(), upstream, extra), want + extra)


def test_names_bad_layouts():
    weights, biases = _small_encoder(torch.float32, 1)
    x = torch.rand(1, 1, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="four per dense block"):
        kernels.dense_encoder(x, weights[:-1], biases[:-1])
    with pytest.raises(ValueError, match="adjust convolution must read the block.s 13 channels"):
        kernels.dense_encoder(x, weights[:4] + [weights[4][:, :12]] + weights[5:], biases)
    with pytest.raises(ValueError, match="sides of 8 pixels or more, got 7 x 8"):
        kernels.dense_encoder(x[..., :7, :], weights, biases)


def test_opcheck():
    weights, biases = _small_encoder(torch.float32, 2, channels=(1, 2, 2, 3))
    x = torch.rand(1, 1, 8, 9, device=DEVICE).requires_grad_()
    torch.library.opcheck(torch.ops.crossfuse.dense_encoder, (x, weights, biases, False, True))
