"""``crossfuse_fast.fast.model``: the whole model on the fast path, and the weights it derives."""
import copy

import pytest
import torch
from utils import DEVICE

from crossfuse_fast import CrossFuse, fuse
from crossfuse_fast.fast import FastCrossEncoder, FastCrossFuse
from crossfuse_fast.tiling import fuse_in_tiles


def test_model_made_in_inference_mode(model):
    """Parameters made under ``torch.inference_mode`` keep no version counter (reading one raised
    before): the fast path then derives its box values and folded weights on every call, so a
    write into such a weight still shows."""
    exact = copy.deepcopy(model).double()  # float64: fp32 results can stray (README, Numerics)
    with torch.inference_mode():
        inference_model = CrossFuse().double().eval()
        inference_model.load_state_dict(exact.state_dict())
    generator = torch.Generator().manual_seed(22)
    ir, vis = (torch.rand(1, 1, 40, 48, generator=generator, dtype=torch.float64) * 255 for _ in range(2))
    reference = fuse(ir, vis, model=exact)
    assert (fuse(ir, vis, model=inference_model, backend="fast") - reference).abs().max().item() < 1e-9
    network = FastCrossFuse(inference_model, "torch")
    decoder = inference_model.fusion.decoder_fusion
    with torch.inference_mode():
        before = network(ir, vis)
        decoder.conv_block[0].conv2d[1].running_var[3].mul_(4)
        folded_changed = network(ir, vis)
        assert (folded_changed - inference_model(ir, vis)).abs().max().item() < 1e-9
        decoder.weight.conv_sh.weight[0, 0, 0, 0] += 1.0
        box_changed = network(ir, vis)
        assert (box_changed - inference_model(ir, vis)).abs().max().item() < 1e-9  # the reference decoder
    assert (folded_changed - before).abs().max().item() > 1
    assert (box_changed - folded_changed).abs().max().item() > 1


def test_a_pair_through_the_triton_kernels_only(model, monkeypatch):
    """``FastCrossFuse(model, "triton")`` (interpreter): images to fused image on our kernels, with no
    PyTorch convolution, attention, pooling or padding left (the GEMMs of the cross encoder's
    projections stay cuBLAS's); within twice the fp32 reference's own error against float64, plus
    1e-3 grey levels (as ``fuse(backend="fast")`` is held to); and the same in 16-pixel tiles. Sides
    that are not multiples of 8, so the decoder's size adjust runs too (by address).

    The tiles cut the encoders and the decoder only: the cross encoder sees the whole deep map
    either way, so in tiles it runs on its twins (its kernels ran above, and its window is this
    test's largest cost in Triton's interpreter)."""
    generator = torch.Generator().manual_seed(23)
    ir, vis = ((torch.rand(1, 1, 19, 29, generator=generator) * 255).to(DEVICE) for _ in range(2))
    model = copy.deepcopy(model).to(DEVICE)
    exact = copy.deepcopy(model).double()(ir.double(), vis.double())
    with torch.no_grad():
        reference = model(ir, vis)
        for name in ("conv2d", "scaled_dot_product_attention", "avg_pool2d", "max_pool2d", "pad", "layer_norm",
                     "interpolate", "gelu"):
            monkeypatch.setattr(torch.nn.functional, name, lambda *args, name=name, **kwargs: pytest.fail(
                f"torch.nn.functional.{name} ran on the Triton path"))
        network = FastCrossFuse(model, "triton")
        got = network(ir, vis)
    assert got.shape == (1, 1, 19, 29)
    bound = 2 * (reference.double() - exact).abs().max().item() + 1e-3
    assert (got.double() - exact).abs().max().item() <= bound
    # In tiles (crossfuse_fast.tiling) on the same encoder and decoder kernels; the deep maps are
    # padded to whole windows there, by F.pad, so the functions are given back first.
    monkeypatch.undo()
    network.fusion.encoder = FastCrossEncoder(model.fusion.cross_atten_block, "torch")
    with torch.no_grad():
        tiled = fuse_in_tiles(network, ir, vis, 16)
    assert (tiled.double() - exact).abs().max().item() <= bound


def test_float64_runs_the_twins_whatever_the_kernel_backend(model):
    """The kernels take 32- and 16-bit floats: in float64 ``"triton"`` runs the PyTorch twins and
    gives the reference's result (the convolution kernels' float64 results were wrong by up to 276
    grey levels before)."""
    generator = torch.Generator().manual_seed(24)
    ir, vis = (torch.rand(1, 1, 16, 24, generator=generator, dtype=torch.float64) * 255 for _ in range(2))
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        got = FastCrossFuse(exact, "triton")(ir, vis)
        assert (got - exact(ir, vis)).abs().max().item() < 1e-9
