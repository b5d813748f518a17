"""Both training stages: finite, decreasing losses; gradients reach exactly the used parameters."""
import copy
import re

import numpy as np
import pytest
import torch

from crossfuse_fast import CrossFuse
from crossfuse_fast.cli import main
from crossfuse_fast.data import SyntheticPairs
from crossfuse_fast.fast import FastFusionNet
from crossfuse_fast.losses import autoencoder_loss, fusion_loss, gradient_loss, laplacian, order_loss
from crossfuse_fast.reference import AutoEncoder, FusionNet
from crossfuse_fast.synthetic import synthetic_batch
from crossfuse_fast.train import train_autoencoder, train_fusion

# Parameters of the released fusion network that its forward never reads.
UNUSED_FUSION_PARAMETERS = re.compile(
    r"cross_atten_block\.cross_atten_block\.cross_atten\d\.blocks\.\d\.attn\.qkv\.(weight|bias)"
    r"|cross_atten_block\.self_atten_block\d\.self_atten\d\.norm\.(weight|bias)"
    r"|conv_gra\.weight"
    r"|decoder_fusion\.weight\.conv_(sh|de)\.weight")


def optimise(loss_fn, parameters, lr, steps=4):
    optimizer = torch.optim.Adam(parameters, lr=lr, weight_decay=0.9)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_autoencoder_loss_finite_and_decreasing():
    torch.manual_seed(0)
    autoencoder = AutoEncoder()
    images, _ = synthetic_batch(2, 64, 64, seed=10)
    losses = optimise(lambda: autoencoder_loss(autoencoder, images), autoencoder.parameters(), lr=1e-4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_autoencoder_gradients_reach_every_parameter():
    torch.manual_seed(0)
    autoencoder = AutoEncoder()
    images, _ = synthetic_batch(2, 64, 64, seed=11)
    autoencoder_loss(autoencoder, images).backward()
    for name, parameter in autoencoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def stage2():
    torch.manual_seed(0)
    return AutoEncoder().eval(), AutoEncoder().eval(), FusionNet().train(), synthetic_batch(2, 256, 256, seed=12)


def test_fusion_gradients_reach_exactly_the_used_parameters(stage2):
    ir_autoencoder, vis_autoencoder, fusion, (ir, vis) = stage2
    fusion.zero_grad(set_to_none=True)
    loss = fusion_loss(fusion, ir_autoencoder, vis_autoencoder, ir, vis)
    assert torch.isfinite(loss)
    loss.backward()
    unused = []
    for name, parameter in fusion.named_parameters():
        if UNUSED_FUSION_PARAMETERS.fullmatch(name):
            assert parameter.grad is None, name
            unused.append(name)
        else:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert len(unused) == 4 + 8 + 1 + 2  # cross qkv, self-module norms, conv_gra, box filters
    for encoder in (ir_autoencoder, vis_autoencoder):
        assert all(p.grad is None for p in encoder.parameters())


def test_fusion_loss_decreases_and_leaves_encoders_untouched(stage2):
    ir_autoencoder, vis_autoencoder, _, (ir, vis) = stage2
    torch.manual_seed(1)
    fusion = FusionNet().train()
    encoders_before = [p.clone() for e in (ir_autoencoder, vis_autoencoder) for p in e.parameters()]
    trainable = [p for p in fusion.parameters() if p.requires_grad]
    losses = optimise(lambda: fusion_loss(fusion, ir_autoencoder, vis_autoencoder, ir, vis), trainable, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    encoders_after = [p for e in (ir_autoencoder, vis_autoencoder) for p in e.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(encoders_before, encoders_after))
    assert torch.all(fusion.decoder_fusion.weight.conv_de.weight == 1 / 9)


def test_order_and_gradient_targets():
    ir = torch.zeros(1, 1, 24, 24)
    vis = torch.full((1, 1, 24, 24), 50.0)
    ir[..., 4:20, 4:20] = 200.0
    # Far inside the hot square infrared wins, far outside visible: the target is their choice.
    target = torch.where(ir > 100, ir, vis)
    assert order_loss(target, ir, vis) < order_loss(vis, ir, vis)
    assert gradient_loss(ir, ir, vis) == 0
    assert gradient_loss(vis, ir, vis) > 0
    bump = torch.zeros(1, 1, 5, 5)
    bump[..., 2, 2] = 1.0
    assert laplacian(bump)[0, 0, 2, 2] == -4 and laplacian(bump)[0, 0, 1, 2] == 1


def test_training_loops_write_loadable_checkpoints(tmp_path):
    logs = []
    train_autoencoder(SyntheticPairs(2, 32, modality="ir"), tmp_path / "ir", epochs=1, max_steps=1, log=logs.append)
    train_autoencoder(SyntheticPairs(2, 32, modality="vis"), tmp_path / "vis", epochs=1, max_steps=1,
                      log=logs.append)
    ir_ae = AutoEncoder()
    ir_ae.load_state_dict(torch.load(tmp_path / "ir" / "autoencoder_epoch1.model", weights_only=True))
    vis_ae = AutoEncoder()
    vis_ae.load_state_dict(torch.load(tmp_path / "vis" / "autoencoder_epoch1.model", weights_only=True))
    train_fusion(SyntheticPairs(2, 64), ir_ae, vis_ae, tmp_path / "fusion", epochs=2, batch_size=2, max_steps=1,
                 log=logs.append)
    model = CrossFuse.from_original(ir_autoencoder=tmp_path / "ir" / "autoencoder_epoch1.model",
                                    vis_autoencoder=tmp_path / "vis" / "autoencoder_epoch1.model",
                                    fusion=tmp_path / "fusion" / "fusion_epoch2.model")
    assert model is not None
    assert any(line.startswith("fusion epoch 2 step 1 loss") for line in logs)
    with pytest.raises(FileExistsError, match="fusion_epoch1.model exists"):
        train_fusion(SyntheticPairs(2, 64), ir_ae, vis_ae, tmp_path / "fusion", epochs=1, log=logs.append)


def test_curves_span_a_factor_of_ten_on_a_log_scale():
    from crossfuse_fast.training_pictures import curve_heights
    heights, logarithmic = curve_heights(np.array([100.0, 10.0, 1.0]))
    assert logarithmic and np.allclose(heights, [1.0, 0.5, 0.0])
    for linear in ([3.0, 2.0, 1.0], [0.0, 50.0, 100.0], [-1.0, 0.0, 1.0]):
        heights, logarithmic = curve_heights(np.array(linear))
        assert not logarithmic and np.allclose(heights, [(v - min(linear)) / (max(linear) - min(linear))
                                                         for v in linear])
    assert np.array_equal(curve_heights(np.array([5.0, 5.0]))[0], [0.0, 0.0])


def test_keep_leaves_the_last_epochs_only(tmp_path):
    train_autoencoder(SyntheticPairs(2, 16, modality="ir"), tmp_path, epochs=3, max_steps=1, keep=2,
                      backend="reference", log=lambda line: None)
    assert sorted(p.name for p in tmp_path.glob("*.model")) == ["autoencoder_epoch2.model", "autoencoder_epoch3.model"]


def test_learning_rate_schedule(tmp_path, monkeypatch):
    autoencoder = AutoEncoder()
    seen = []
    original_step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    train_autoencoder(SyntheticPairs(2, 16, modality="ir"), tmp_path, epochs=4, max_steps=1,
                      autoencoder=autoencoder, log=lambda line: None)
    assert seen == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])


def test_learning_rate_decay_epoch_from_the_command_line(tmp_path, monkeypatch):
    seen = []
    original_step = torch.optim.Adam.step

    def record(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    assert main(["train-autoencoder", "--synthetic", "2", "--synthetic-modality", "ir", "--size", "16",
                 "--epochs", "4", "--max-steps", "1", "--lr-decay-epoch", "4", "--backend", "reference",
                 "--out", str(tmp_path)]) == 0
    assert seen == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5])


def test_stage_one_loss_traces_as_one_graph():
    """MS-SSIM's dynamic-range guess is tensor math, not a Python branch on data, so
    ``torch.compile`` of the stage-1 loss needs no graph breaks (it had nine, one per guess)."""
    explanation = torch._dynamo.explain(autoencoder_loss)(AutoEncoder(), torch.rand(2, 1, 32, 32) * 255)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]


def _released_style_fusion_loss(fusion, ir_autoencoder, vis_autoencoder, ir, vis):
    """The stage-2 loss as the released ``train_module`` computes it: the cross encoder on the whole
    deep maps, no windows, no shift."""
    with torch.no_grad():
        ir_shallow, ir_deep = ir_autoencoder.encode(ir)
        vis_shallow, vis_deep = vis_autoencoder.encode(vis)
    fused_deep = fusion.cross_atten_block(ir_deep, vis_deep, shift=False)
    fused = fusion.decoder_fusion(fused_deep, ir_deep, ir_shallow, vis_deep, vis_shallow)
    return order_loss(fused, ir, vis) + 10 * gradient_loss(fused, ir, vis)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 128), (256, 256)])
def test_stage_two_encodes_whole_deep_maps_as_released(height, width):
    """Training runs the cross encoder on each whole deep map, as the released code: its loss equals
    the released computation bit for bit at any crop size. Cut into 32 x 32 windows (as inference
    does) it is the same on 256 x 256 crops only."""
    torch.manual_seed(1)
    ir_autoencoder, vis_autoencoder, fusion = AutoEncoder().eval(), AutoEncoder().eval(), FusionNet().train()
    ir, vis = synthetic_batch(2, height, width, seed=6)
    torch.manual_seed(2)
    released = _released_style_fusion_loss(fusion, ir_autoencoder, vis_autoencoder, ir, vis)
    torch.manual_seed(2)
    ours = fusion_loss(fusion, ir_autoencoder, vis_autoencoder, ir, vis)
    assert torch.equal(ours, released)
    with torch.no_grad():
        ir_shallow, ir_deep = ir_autoencoder.encode(ir)
        vis_shallow, vis_deep = vis_autoencoder.encode(vis)
        windowed = fusion(ir_deep, ir_shallow, vis_deep, vis_shallow, shift=False)
        whole = fusion(ir_deep, ir_shallow, vis_deep, vis_shallow, shift=False, windows=False)
    if (height, width) == (256, 256):
        assert torch.equal(windowed, whole)
    else:
        assert (windowed - whole).abs().max().item() > 1e-2


def test_each_epoch_draws_its_curves_and_samples(tmp_path):
    """Per epoch: the loss curves (a panel per term) and a grid of samples; the loss CSV has a row
    per step with the loss and its unweighted terms."""
    import csv

    import cv2
    train_autoencoder(SyntheticPairs(6, 32, modality="ir"), tmp_path, epochs=2, batch_size=2, backend="reference",
                      log=lambda line: None)
    rows = list(csv.DictReader(open(tmp_path / "autoencoder_losses.csv")))
    assert [(r["epoch"], r["step"]) for r in rows] == [(e, s) for e in "12" for s in "123"]
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["pixel"]) + 10000 * float(r["ssim"]), rel=1e-6)
    curves = cv2.imread(str(tmp_path / "autoencoder_losses.png"))
    assert curves.shape[0] == 3 * 170  # loss, pixel, ssim
    grid = cv2.imread(str(tmp_path / "autoencoder_samples_epoch2.png"))
    assert grid.shape == (28 + 4 * (6 + 160), 2 * 160 + 6, 3)  # header, then 4 samples of input | reconstruction
    assert (tmp_path / "autoencoder_samples_epoch1.png").exists()


def test_cached_deep_maps_give_the_same_training(tmp_path, monkeypatch):
    """``cache_features``: the deep maps are encoded once (not at every step), reused by a resume,
    made again for other encoders, and the run's losses and weights are the uncached run's up to
    float rounding."""
    import csv

    torch.manual_seed(3)
    encoders, start = (AutoEncoder(), AutoEncoder()), FusionNet()
    data = SyntheticPairs(6, 64)
    kwargs = dict(epochs=2, batch_size=2, backend="reference", log=lambda line: None)
    plain = train_fusion(data, *encoders, tmp_path / "plain", fusion=copy.deepcopy(start), **kwargs)
    encodes = []
    original = AutoEncoder.encode
    monkeypatch.setattr(AutoEncoder, "encode", lambda self, x: encodes.append(len(x)) or original(self, x))
    cached = train_fusion(data, *encoders, tmp_path / "cached", fusion=copy.deepcopy(start), cache_features=True,
                          **kwargs)
    # Each pair's two images encoded once for the cache, plus the sample picture of each epoch.
    assert sum(encodes) == 2 * 6 + 2 * 2 * 4
    assert (tmp_path / "cached" / "fusion_deep_maps.npy").exists()
    rows = [list(csv.DictReader(open(tmp_path / run / "fusion_losses.csv"))) for run in ("plain", "cached")]
    for a, b in zip(*rows):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    for name, value in plain.state_dict().items():
        assert torch.allclose(value, cached.state_dict()[name], rtol=1e-4, atol=1e-6), name
    encodes.clear()
    train_fusion(data, *encoders, tmp_path / "cached", fusion=FusionNet(), cache_features=True, resume=True, **kwargs)
    assert encodes == []  # the run had ended: nothing to do, and the cache was not made again
    other = (AutoEncoder(), encoders[1])
    train_fusion(data, *other, tmp_path / "cached", fusion=FusionNet(), cache_features=True, overwrite=True,
                 **dict(kwargs, epochs=1))
    assert sum(encodes) >= 2 * 6  # other encoders: the cache is made again


def test_stage_two_refuses_crops_it_cannot_patch(tmp_path):
    with pytest.raises(ValueError, match="multiples of 16 .* got 72 x 72"):
        train_fusion(SyntheticPairs(2, 72), AutoEncoder(), AutoEncoder(), tmp_path, epochs=1, max_steps=1)


@pytest.mark.parametrize("height,width", [(64, 64), (96, 128)])
def test_fast_backend_gives_the_reference_loss_and_gradients(height, width):
    """Stage 2 through ``FastFusionNet`` (PyTorch twins on a CPU): loss and every parameter's gradient
    as close to the float64 reference as the fp32 reference is (three-way), the same parameters
    unused; on crops whose deep maps are not one 32 x 32 window."""
    torch.manual_seed(0)
    ir_autoencoder, vis_autoencoder, fusion = AutoEncoder().eval(), AutoEncoder().eval(), FusionNet().train()
    ir, vis = synthetic_batch(2, height, width, seed=5)

    def loss_and_grads(network, model, autoencoders, images):
        loss = fusion_loss(network, *autoencoders, *images)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        return loss.item(), dict(zip([n for n, _ in named], grads))

    fusion64 = copy.deepcopy(fusion).double()
    autoencoders64 = [copy.deepcopy(a).double() for a in (ir_autoencoder, vis_autoencoder)]
    exact_loss, exact = loss_and_grads(fusion64, fusion64, autoencoders64, (ir.double(), vis.double()))
    reference_loss, reference = loss_and_grads(fusion, fusion, (ir_autoencoder, vis_autoencoder), (ir, vis))
    fast_loss, fast = loss_and_grads(FastFusionNet(fusion), fusion, (ir_autoencoder, vis_autoencoder), (ir, vis))
    assert abs(fast_loss - exact_loss) <= 2 * abs(reference_loss - exact_loss) + 1e-6 * exact_loss
    assert [n for n, g in fast.items() if g is None] == [n for n, g in exact.items() if g is None]
    scale = max(g.abs().max().item() for g in exact.values() if g is not None)

    def worst(grads):
        return max((grads[n] - g).abs().max().item() for n, g in exact.items() if g is not None) / scale

    assert worst(fast) <= 2 * worst(reference) + 1e-6


def test_train_autoencoder_fast_backend(tmp_path, fast_dense_block_calls):
    """Stage 1's fast backend: the fast autoencoder, and on a CPU the convolutions see NHWC maps."""
    autoencoder = AutoEncoder()
    channels_innermost = []
    autoencoder.fea_encoder1.conv1.conv2d[0].register_forward_pre_hook(
        lambda module, inputs: channels_innermost.append(inputs[0].stride()[1] == 1))
    train_autoencoder(SyntheticPairs(2, 32, modality="vis"), tmp_path, epochs=1, max_steps=1, autoencoder=autoencoder,
                      backend="fast", log=lambda line: None)
    # One training step and the epoch's sample picture: two forwards.
    assert (tmp_path / "autoencoder_epoch1.model").exists() and channels_innermost == [True, True]
    assert len(fast_dense_block_calls) == 4, "backend='fast' trained without the fast autoencoder"
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        train_autoencoder(SyntheticPairs(2, 32), tmp_path / "other", epochs=1, backend="triton")


def test_train_fusion_fast_backend(tmp_path, fast_fusion_calls, fast_dense_block_calls):
    calls = fast_fusion_calls
    logs = []
    ir_encoder = AutoEncoder()
    first_conv = ir_encoder.fea_encoder1.conv1.conv2d[0]
    channels_innermost = []
    first_conv.register_forward_pre_hook(lambda module, inputs: channels_innermost.append(inputs[0].stride()[1] == 1))
    fusion = train_fusion(SyntheticPairs(2, 64), ir_encoder, AutoEncoder(), tmp_path, epochs=1, batch_size=2,
                          max_steps=1, backend="fast", log=logs.append)
    assert isinstance(fusion, FusionNet) and (tmp_path / "fusion_epoch1.model").exists()
    assert any(line.startswith("fusion epoch 1 step 1 loss") for line in logs)
    assert calls, "backend='fast' trained without the fast fusion network"
    # One training step and the epoch's sample picture: two encodings of each modality.
    assert len(fast_dense_block_calls) == 8, "backend='fast' encoded without the fast autoencoders"
    assert channels_innermost == [True, True], "the fast backend's CPU convolutions run in channels_last"
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        train_fusion(SyntheticPairs(2, 64), AutoEncoder(), AutoEncoder(), tmp_path / "other", epochs=1,
                     backend="triton")
