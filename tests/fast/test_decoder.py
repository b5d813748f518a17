"""``crossfuse_fast.fast.decoder`` and ``.box_filter``: the fusion decoder with its box filters as
their algebra, its upsamplings and BatchNorms folded, and the caches of what is derived from the weights."""
import copy

import pytest
import torch
from utils import DEVICE, assert_three_way

from crossfuse_fast import kernels
from crossfuse_fast.fast import FastFusionDecoder, FastFusionNet, FoldedConvLayer
from crossfuse_fast.fast import box_filter


@pytest.mark.parametrize("mode", ["inference", "gradients"])
def test_fast_decoder_is_the_reference(model, mode):
    """The fusion decoder with its fixed box filters as channel sum + box sum, and in inference its
    BatchNorms folded, equals the reference decoder (fp64: only the order of operations differs).
    It runs neither box convolution; the BatchNorms only where gradients are wanted."""
    decoder = copy.deepcopy(model.fusion.decoder_fusion).double()
    torch.manual_seed(8)
    fused, ir_deep, vis_deep = (torch.randn(2, 128, 5, 7, dtype=torch.float64) for _ in range(3))
    ir_shallow, vis_shallow = (torch.rand(2, 32, 43, 61, dtype=torch.float64) for _ in range(2))
    calls = []
    for module in decoder.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Upsample)):
            module.register_forward_pre_hook(lambda module, inputs: calls.append(module))
    box_filters = {decoder.weight.conv_de, decoder.weight.conv_sh}
    with torch.set_grad_enabled(mode == "gradients"):
        fast = FastFusionDecoder(decoder)(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
        ran = list(calls)
        reference = decoder(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
    assert not box_filters & set(ran)
    assert not any(isinstance(m, torch.nn.Upsample) for m in ran)  # folded into the convolutions
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ran) == (0 if mode == "inference" else 5)
    assert (fast - reference).abs().max().item() < 1e-9 * 255


def test_folded_weights_follow_changes(model):
    """The folded weights are made once and again only when a weight or statistic changes (written
    in place, or replaced): the result then is the reference decoder's on the new values."""
    decoder = copy.deepcopy(model.fusion.decoder_fusion).double()  # float64: see README, Numerics
    torch.manual_seed(10)
    inputs = tuple(x.double() for x in (torch.randn(1, 128, 4, 6), torch.randn(1, 128, 4, 6),
                                        torch.rand(1, 32, 32, 48), torch.randn(1, 128, 4, 6),
                                        torch.rand(1, 32, 32, 48)))
    folds = []
    fold = FoldedConvLayer._fold
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(FoldedConvLayer, "_fold", lambda self: folds.append(self) or fold(self))
        fast = FastFusionDecoder(decoder)
        before = fast(*inputs)
        fast(*inputs)
        assert len(folds) == 5
        # The decoder is affine up to the min-max stretch, which undoes changes common to all channels.
        decoder.conv_block[2].conv2d[1].running_var[5].mul_(4)
        conv = decoder.conv1.conv2d[0]
        conv.weight = torch.nn.Parameter(conv.weight + 0.1 * torch.randn_like(conv.weight))
        after = fast(*inputs)
        assert len(folds) == 7
        reference = decoder(*inputs)
    assert (after - before).abs().max().item() > 1
    assert (after - reference).abs().max().item() < 1e-9


@pytest.mark.parametrize("change", ["one weight", "bias"])
def test_fast_decoder_with_other_box_weights_is_the_reference(model, change):
    """The algebra holds for uniform weights only: anything else runs the reference decoder, also
    when the weights change after the fast network was made (it checks them once, then on change)."""
    fusion = copy.deepcopy(model.fusion)
    fast = FastFusionNet(fusion, "torch")
    torch.manual_seed(9)
    ir_deep, vis_deep = (torch.randn(1, 128, 4, 6) for _ in range(2))
    ir_shallow, vis_shallow = (torch.rand(1, 32, 32, 48) for _ in range(2))
    with torch.no_grad():
        uniform = fast(ir_deep, ir_shallow, vis_deep, vis_shallow)
        if change == "one weight":
            fusion.decoder_fusion.weight.conv_sh.weight[3, 5, 1, 2] += 0.25
        else:
            fusion.decoder_fusion.weight.conv_de.bias = torch.nn.Parameter(torch.full((128,), 0.5),
                                                                           requires_grad=False)
        changed = fast(ir_deep, ir_shallow, vis_deep, vis_shallow)
        fused = fast.fuse_deep(ir_deep, vis_deep)
        reference = fusion.decoder_fusion(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
    assert torch.equal(changed, reference)
    assert not torch.equal(changed, uniform)


def test_fast_decoder_reads_the_box_weights_once(model, monkeypatch):
    """Reading the weights' values waits for a GPU: done when the fast network is made, not per call."""
    reads = []
    uniform_value = box_filter._uniform_value
    monkeypatch.setattr(box_filter, "_uniform_value", lambda conv: reads.append(conv) or uniform_value(conv))
    network = FastFusionNet(model.fusion, "torch")
    assert len(reads) == 2
    ir_deep, vis_deep = (torch.rand(1, 128, 4, 4) for _ in range(2))
    ir_shallow, vis_shallow = (torch.rand(1, 32, 32, 32) for _ in range(2))
    with torch.no_grad():
        for _ in range(3):
            network(ir_deep, ir_shallow, vis_deep, vis_shallow)
    assert len(reads) == 2


def test_triton_decoder_is_the_reference(model, poisoned_allocations, monkeypatch):
    """In inference on the Triton kernels (interpreter): the folded 3 x 3 and 1 x 1 convolutions and
    the upsampling phases, the stretch's statistics gathered by conv_last, within twice the
    reference decoder's own fp32 error against fp64, on a size that needs the size adjust."""
    ends = []
    fused_end = kernels.conv2d_minmax_to_255
    monkeypatch.setattr(kernels, "conv2d_minmax_to_255", lambda *args: ends.append(args) or fused_end(*args))
    monkeypatch.setattr(kernels, "minmax_to_255", lambda *args: pytest.fail("the stretch ran apart from conv_last"))
    decoder = copy.deepcopy(model.fusion.decoder_fusion).to(DEVICE)
    torch.manual_seed(12)
    fused, ir_deep, vis_deep = (torch.randn(1, 128, 3, 4, device=DEVICE) for _ in range(3))
    ir_shallow, vis_shallow = (torch.rand(1, 32, 27, 33, device=DEVICE) for _ in range(2))
    inputs = (fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
    with torch.no_grad():
        exact = copy.deepcopy(decoder).double()(*(x.double() for x in inputs))
        plain = decoder(*inputs)
        got = FastFusionDecoder(decoder, kernel_backend="triton")(*inputs)
    assert len(ends) == 1 and got.shape == exact.shape == (1, 1, 27, 33)
    assert_three_way(got, exact, plain, torch.float32)


def test_triton_decoder_gradients_are_the_reference_ones(model):
    """Training on the Triton kernels (interpreter): BatchNorm on the batch's statistics, the
    convolutions and upsampling phases with their Triton backwards, the weighted sums passing the
    gradient to the decoder's maps; every gradient (the decoder's parameters and the fused map)
    within twice the reference's own fp32 error against fp64."""
    decoder = copy.deepcopy(model.fusion.decoder_fusion).train().to(DEVICE)
    exact = copy.deepcopy(decoder).double()
    torch.manual_seed(13)
    fused, ir_deep, vis_deep = (torch.randn(2, 128, 2, 3, device=DEVICE) for _ in range(3))
    ir_shallow, vis_shallow = (torch.rand(2, 32, 16, 24, device=DEVICE) for _ in range(2))

    def grads(network, module, dtype):
        inputs = [x.to(dtype) for x in (fused, ir_deep, ir_shallow, vis_deep, vis_shallow)]
        inputs[0].requires_grad_()
        parameters = [p for p in module.parameters() if p.requires_grad]
        return torch.autograd.grad(network(*inputs).square().mean(), [inputs[0], *parameters])

    want = grads(exact, exact, torch.float64)
    plain = grads(decoder, decoder, torch.float32)
    got = grads(FastFusionDecoder(decoder, kernel_backend="triton"), decoder, torch.float32)
    scale = max(w.abs().max().item() for w in want)
    for g, w, p in zip(got, want, plain):
        assert (g.double() - w).abs().max().item() <= 2 * (p.double() - w).abs().max().item() + 1e-6 * scale
