"""The convolution half of the fast path (``crossfuse_fast.fast_convs``): dense blocks padded piece by
piece, the decoder's box filters as their algebra, BatchNorms folded in inference, and the caches
of what is derived from the weights."""
import copy

import pytest
import torch

from crossfuse_fast import CrossFuse, fast_convs, fuse
from crossfuse_fast.fast import FastCrossFuse, FastFusionNet
from crossfuse_fast.fast_convs import FastAutoEncoder, FastFusionDecoder, FoldedConvLayer
from crossfuse_fast.reference import AutoEncoder
from crossfuse_fast.reference.autoencoder import DenseBlock, ReflectionPad
from crossfuse_fast.synthetic import randomize_batch_norms


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


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (1, 4, 1, 6), (1, 3, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_upsampled_conv_is_upsample_pad_conv(shape, channels_last):
    """The four 2 x 2 phase convolutions equal the 3 x 3 convolution of the reflection-padded nearest
    2x upsampling (fp64: only the order of the sums differs), maps of one pixel included, in the
    input's layout; with and without a bias."""
    torch.manual_seed(sum(shape))
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.float64)
    for bias in (torch.randn(6, dtype=torch.float64), None):
        upsampled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        want = torch.nn.functional.conv2d(ReflectionPad(1)(upsampled), weight, bias)
        got = fast_convs.upsampled_conv(x, fast_convs.phase_kernels(weight), bias)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
        if not (x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)):  # one pixel: both
            assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_folded_layer_is_conv_then_batch_norm():
    """One ``ConvLayer`` with its BatchNorm folded, fp32, against the layer in fp64: as close as the
    layer itself in fp32; and the layer as it is in training mode (batch statistics)."""
    torch.manual_seed(4)
    fusion = randomize_batch_norms(CrossFuse(), seed=4).fusion
    layer = fusion.decoder_fusion.conv1.eval()
    x = torch.randn(2, 128, 9, 11)
    folded = FoldedConvLayer(layer)
    with torch.no_grad():
        exact = copy.deepcopy(layer).double()(x.double())
        layer_error = (layer(x) - exact).abs().max().item()
        assert (folded(x) - exact).abs().max().item() <= 4 * layer_error
        layer.train()
        assert torch.equal(folded(x), layer(x))


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
        fused = fast.encoder.fuse_deep(ir_deep, vis_deep)
        reference = fusion.decoder_fusion(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
    assert torch.equal(changed, reference)
    assert not torch.equal(changed, uniform)


def test_fast_decoder_reads_the_box_weights_once(model, monkeypatch):
    """Reading the weights' values waits for a GPU: done when the fast network is made, not per call."""
    reads = []
    uniform_value = fast_convs._uniform_value
    monkeypatch.setattr(fast_convs, "_uniform_value", lambda conv: reads.append(conv) or uniform_value(conv))
    network = FastFusionNet(model.fusion, "torch")
    assert len(reads) == 2
    ir_deep, vis_deep = (torch.rand(1, 128, 4, 4) for _ in range(2))
    ir_shallow, vis_shallow = (torch.rand(1, 32, 32, 32) for _ in range(2))
    with torch.no_grad():
        for _ in range(3):
            network(ir_deep, ir_shallow, vis_deep, vis_shallow)
    assert len(reads) == 2


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
