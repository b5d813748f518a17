"""``crossfuse_fast.fast.encoder``: the dense blocks padded piece by piece, bit for bit the reference;
on the Triton convolutions, each dense block in one buffer, the reference up to rounding."""
import copy

import pytest
import torch
from utils import DEVICE, assert_three_way

from crossfuse_fast.fast import FastAutoEncoder
from crossfuse_fast.reference import AutoEncoder
from crossfuse_fast.reference.autoencoder import DenseBlock, ReflectionPad


def dense_padded_channels(autoencoder: AutoEncoder, run) -> int:
    """Channels reflection-padded inside the encoder's dense blocks while ``run()`` runs."""
    padded = []
    hooks = [pad.register_forward_pre_hook(lambda module, inputs: padded.append(inputs[0].shape[1]))
             for block in autoencoder.modules() if isinstance(block, DenseBlock)
             for pad in block.modules() if isinstance(pad, ReflectionPad)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return sum(padded)


@pytest.mark.parametrize("height,width", [(64, 80), (37, 50), (8, 8), (16, 9)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fast_encoder_is_the_reference_bit_for_bit(height, width, channels_last):
    """Padding each piece once builds the very tensors the reference convolves, in either layout, also
    where the deep maps are a pixel or two wide (the padding then repeats as ``reflect_pad_extended``)."""
    torch.manual_seed(height * width)
    autoencoder = AutoEncoder().eval()
    images = torch.rand(2, 1, height, width) * 255
    if channels_last:
        images = torch.empty_like(images, memory_format=torch.channels_last).copy_(images)
    with torch.no_grad():
        reference = autoencoder.encode(images)
        fast = FastAutoEncoder(autoencoder, channels_last).encode(images)
        assert torch.equal(FastAutoEncoder(autoencoder, channels_last)(images), autoencoder(images))
    for want, got in zip(reference, fast):
        assert torch.equal(got, want)


def test_fast_encoder_pads_the_pieces_once():
    """What makes it faster: 32 + 64 x 3 and 128 + 64 x 3 channels padded in the two dense blocks,
    against the reference's 32 + 96 + 160 + 224 and 128 + 192 + 256 + 320."""
    autoencoder = AutoEncoder().eval()
    images = torch.rand(1, 1, 32, 32) * 255
    with torch.no_grad():
        assert dense_padded_channels(autoencoder, lambda: autoencoder.encode(images)) == 512 + 896
        assert dense_padded_channels(autoencoder, lambda: FastAutoEncoder(autoencoder).encode(images)) == 224 + 320


def test_fast_encoder_refuses_other_paddings():
    """Padding each piece once needs one padding for every convolution of a block: say so otherwise."""
    autoencoder = AutoEncoder()
    autoencoder.fea_encoder1.dense_blocks[0].dense_conv1.pad = ReflectionPad(2)
    with pytest.raises(ValueError, match="pad by one pixel"):
        FastAutoEncoder(autoencoder)


def test_fast_autoencoder_gradients_are_the_reference_ones():
    """Stage 1 through ``FastAutoEncoder`` reaches the autoencoder's own parameters with the
    reference's gradients (fp64: the padding's gradient is summed in another order)."""
    torch.manual_seed(3)
    autoencoder = AutoEncoder().double().train()
    images = torch.rand(2, 1, 24, 40, dtype=torch.float64) * 255
    parameters = list(autoencoder.parameters())
    want = torch.autograd.grad(autoencoder(images).square().mean(), parameters)
    got = torch.autograd.grad(FastAutoEncoder(autoencoder)(images).square().mean(), parameters)
    scale = max(g.abs().max().item() for g in want)
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-12 * scale


@pytest.mark.parametrize("height,width", [(16, 24), (9, 13)])
def test_triton_encoder_is_the_reference(poisoned_allocations, height, width):
    """On the Triton convolutions (interpreter), each dense block in one buffer: the reference's maps
    up to rounding, within twice the reference's own fp32 error against fp64, odd sizes and
    one-pixel deep maps included; every pixel of the buffers written."""
    torch.manual_seed(height + width)
    autoencoder = AutoEncoder().eval().to(DEVICE)
    images = torch.rand(2, 1, height, width, device=DEVICE) * 255
    with torch.no_grad():
        exact = copy.deepcopy(autoencoder).double().encode(images.double())
        plain = autoencoder.encode(images)
        fast = FastAutoEncoder(autoencoder, kernel_backend="triton").encode(images)
    for name, got, want, low in zip(("shallow", "deep"), fast, exact, plain):
        assert got.shape == want.shape, name
        assert_three_way(got, want, low, torch.float32, name=name)


def test_triton_encoder_gradients_are_the_reference_ones(monkeypatch):
    """With gradients the Triton path keeps each dense block in one buffer too
    (``kernels.dense_encoder``: no ``torch.cat``, no PyTorch pool, forward or backward): the
    encoder's own parameters get the reference's gradients of a loss on both maps (fp32 against
    fp64, within twice the reference's own error), at the model's channel counts and odd sides."""
    torch.manual_seed(4)
    autoencoder = AutoEncoder().train().to(DEVICE)
    exact = copy.deepcopy(autoencoder).double()
    images = torch.rand(2, 1, 17, 9, device=DEVICE) * 255
    encoder = autoencoder.fea_encoder1

    def grads(model, network, images):
        shallow, deep = network.encode(images)
        return torch.autograd.grad(shallow.square().mean() + deep.square().mean(),
                                   list(model.fea_encoder1.parameters()))

    want = grads(exact, exact, images.double())
    plain = grads(autoencoder, autoencoder, images)
    for name in ("cat",):
        monkeypatch.setattr(torch, name, lambda *args, name=name, **kwargs: pytest.fail(f"torch.{name} ran"))
    for name in ("max_pool2d", "conv2d", "pad"):
        monkeypatch.setattr(torch.nn.functional, name, lambda *args, name=name, **kwargs: pytest.fail(
            f"torch.nn.functional.{name} ran"))
    got = grads(autoencoder, FastAutoEncoder(autoencoder, kernel_backend="triton"), images)
    monkeypatch.undo()
    assert len(got) == len(list(encoder.parameters()))
    scale = max(w.abs().max().item() for w in want)
    for g, w, p in zip(got, want, plain):
        assert (g.double() - w).abs().max().item() <= 2 * (p.double() - w).abs().max().item() + 1e-6 * scale
