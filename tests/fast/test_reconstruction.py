"""``crossfuse_fast.fast.reconstruction``: the autoencoder's reconstruction decoder on the Triton
kernels (stage 1), forward and every gradient, against the reference."""
import copy

import pytest
import torch
from utils import DEVICE, assert_three_way

from crossfuse_fast.fast import FastAutoEncoder
from crossfuse_fast.reference import AutoEncoder


@pytest.mark.parametrize("height,width", [(16, 24), (17, 13)])
def test_triton_autoencoder_reconstructs_as_the_reference(poisoned_allocations, monkeypatch, height, width):
    """Encode and decode on the kernels (upsamplings folded into the convolutions after them, the
    last one with the size adjust and the added shallow map in one pass; no PyTorch convolution,
    pooling, padding or upsampling): within twice the reference's own fp32 error against fp64."""
    torch.manual_seed(height * width)
    autoencoder = AutoEncoder().eval().to(DEVICE)
    images = torch.rand(2, 1, height, width, device=DEVICE) * 255
    with torch.no_grad():
        exact = copy.deepcopy(autoencoder).double()(images.double())
        plain = autoencoder(images)
        for name in ("conv2d", "max_pool2d", "pad", "interpolate"):
            monkeypatch.setattr(torch.nn.functional, name, lambda *args, name=name, **kwargs: pytest.fail(
                f"torch.nn.functional.{name} ran on the Triton path"))
        got = FastAutoEncoder(autoencoder, kernel_backend="triton")(images)
    assert got.shape == exact.shape == (2, 1, height, width)
    assert_three_way(got, exact, plain, torch.float32)


def test_triton_autoencoder_trains_as_the_reference():
    """Stage 1 on the kernels: every parameter's gradient of a reconstruction loss within twice the
    reference's own fp32 error against fp64."""
    torch.manual_seed(5)
    autoencoder = AutoEncoder().train().to(DEVICE)
    exact = copy.deepcopy(autoencoder).double()
    images = torch.rand(2, 1, 16, 8, device=DEVICE) * 255

    def grads(model, network, images):
        return torch.autograd.grad((network(images) - images).square().mean(), list(model.parameters()))

    want = grads(exact, exact, images.double())
    plain = grads(autoencoder, autoencoder, images)
    got = grads(autoencoder, FastAutoEncoder(autoencoder, kernel_backend="triton"), images)
    scale = max(w.abs().max().item() for w in want)
    for g, w, p in zip(got, want, plain):
        assert (g.double() - w).abs().max().item() <= 2 * (p.double() - w).abs().max().item() + 1e-6 * scale
