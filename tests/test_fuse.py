"""``fuse()``: windows, batches, sizes, numpy images and colour, and every documented bad input."""
import copy
import gc
import weakref

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossfuse_fast import fast as fast_module
from crossfuse_fast import fuse
from crossfuse_fast.fast import FastCrossFuse
from crossfuse_fast.synthetic import synthetic_batch, synthetic_pair


def relative_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_shift_is_a_no_op(model):
    ir, vis = synthetic_batch(2, 96, 136, seed=1)
    with torch.no_grad():
        shifted = model(ir, vis, shift=True)
        unshifted = model(ir, vis, shift=False)
    assert relative_max_error(shifted, unshifted) < 1e-4


def test_batch_of_three_equals_three_singles(model):
    ir, vis = synthetic_batch(3, 72, 104, seed=2)
    batched = fuse(ir, vis, model=model)
    singles = torch.cat([fuse(ir[i:i + 1], vis[i:i + 1], model=model) for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-3)


def test_windows_one_by_one(model):
    """A 300 x 410 image (deep map 37 x 51, four windows) against its windows run separately."""
    ir, vis = synthetic_batch(1, 300, 410, seed=3)
    with torch.no_grad():
        _, ir_deep = model.ir_autoencoder.encode(ir)
        _, vis_deep = model.vis_autoencoder.encode(vis)
        assert ir_deep.shape[-2:] == (37, 51)
        whole = model.fusion.fuse_deep(ir_deep, vis_deep)
        ir_padded = F.pad(ir_deep, (0, 64 - 51, 0, 64 - 37), mode="reflect")
        vis_padded = F.pad(vis_deep, (0, 64 - 51, 0, 64 - 37), mode="reflect")
        one_by_one = torch.empty_like(ir_padded)
        for top in (0, 32):
            for left in (0, 32):
                window = (slice(None), slice(None), slice(top, top + 32), slice(left, left + 32))
                one_by_one[window] = model.fusion.cross_atten_block(ir_padded[window], vis_padded[window])
    torch.testing.assert_close(whole, one_by_one[:, :, :37, :51], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("height,width", [(8, 8), (17, 23), (64, 64), (480, 640), (8, 300)])
def test_sizes(model, height, width):
    ir, vis = synthetic_batch(1, height, width, seed=height * width)
    fused = fuse(ir, vis, model=model)
    assert fused.shape == (1, 1, height, width)
    assert torch.isfinite(fused).all()
    assert fused.min() >= 0 and fused.max() <= 255.0 + 1e-3
    assert fused.max() - fused.min() > 200  # min-max stretched: not a constant image


@pytest.mark.parametrize("shape", [(2, 1, 64, 80), (1, 1, 300, 410), (1, 1, 8, 8)], ids=lambda s: "x".join(map(str, s)))
def test_fast_backend_is_the_reference_up_to_rounding(model, shape):
    """``backend="fast"`` (the fast cross encoder, PyTorch twins on a CPU): its error against the
    reference in float64 stays within twice the fp32 reference's own, plus a floor of 1e-3 grey
    levels. Padded windows (64 x 80, 300 x 410), batch 2, and a one-pixel deep map (8 x 8)."""
    torch.manual_seed(sum(shape))
    ir, vis = torch.rand(shape) * 255, torch.rand(shape) * 255
    exact = fuse(ir.double(), vis.double(), model=copy.deepcopy(model).double(), backend="reference")
    reference_error = (fuse(ir, vis, model=model, backend="reference") - exact).abs().max().item()
    fast = fuse(ir, vis, model=model, backend="fast")
    assert fast.dtype == torch.float32 and fast.shape == shape
    assert (fast - exact).abs().max().item() <= 2 * reference_error + 1e-3


def test_fast_backend_runs_the_fast_fusion_network(model, fast_fusion_calls, fast_dense_block_calls):
    """The parity tests above would also pass if ``backend="fast"`` ran the reference: check it does not."""
    calls = fast_fusion_calls
    ir, vis = torch.rand(2, 1, 16, 16) * 255, torch.rand(2, 1, 16, 16) * 255
    fuse(ir, vis, model=model, backend="reference")
    assert not calls and not fast_dense_block_calls
    fuse(ir, vis, model=model, backend="fast")
    assert len(calls) == 2  # a CPU runs the batch's images one at a time
    assert len(fast_dense_block_calls) == 2 * 2 * 2  # images x encoders x dense blocks


def test_fast_backend_reuses_its_network(model, monkeypatch):
    """``fuse(backend="fast")`` makes the fast network once per model (making it reads the box weights,
    which waits for a GPU) and reuses it: a weight written in place still shows, a replaced module
    or another model gets a new network, and the cache does not keep a model alive."""
    made = []
    monkeypatch.setattr(fast_module, "FastCrossFuse",
                        type("Counted", (FastCrossFuse,), {"__init__": lambda self, m: made.append(m) or
                                                           FastCrossFuse.__init__(self, m)}))
    mine = copy.deepcopy(model).double()  # float64: fp32 results can stray (README, Numerics)
    generator = torch.Generator().manual_seed(21)
    ir, vis = (torch.rand(1, 1, 24, 32, generator=generator, dtype=torch.float64) * 255 for _ in range(2))
    first = fuse(ir, vis, model=mine, backend="fast")
    fuse(ir, vis, model=mine, backend="fast")
    assert len(made) == 1
    with torch.no_grad():
        mine.fusion.decoder_fusion.conv_block[0].conv2d[1].running_var[3].mul_(4)
    changed = fuse(ir, vis, model=mine, backend="fast")
    assert len(made) == 1 and (changed - first).abs().max().item() > 1
    assert (changed - fuse(ir, vis, model=mine, backend="reference")).abs().max().item() < 1e-9
    mine.fusion.decoder_fusion.conv_last = copy.deepcopy(mine.fusion.decoder_fusion.conv_last)
    with torch.no_grad():
        mine.fusion.decoder_fusion.conv_last.conv2d[1].bias.add_(1.0)  # the min-max stretch undoes it
        mine.fusion.decoder_fusion.conv_last.conv2d[0].weight[0, 3].mul_(-1)
    replaced = fuse(ir, vis, model=mine, backend="fast")
    assert len(made) == 2 and (replaced - fuse(ir, vis, model=mine, backend="reference")).abs().max().item() < 1e-9
    fuse(ir, vis, model=copy.deepcopy(mine), backend="fast")
    assert len(made) == 3
    alive = weakref.ref(mine)
    del mine, made[:]
    gc.collect()
    assert alive() is None


def test_fast_backend_runs_the_convolutions_channels_last_on_a_cpu(model, monkeypatch):
    """Where the fast path's CPU speed-up comes from: every convolution that runs (the decoder's folded
    ones call ``F.conv2d`` themselves) sees its map in NHWC (channels innermost), and the model's own
    parameters stay as they were."""
    encoders = [model.ir_autoencoder.fea_encoder1, model.vis_autoencoder.fea_encoder1]
    decoder = model.fusion.decoder_fusion
    box_filters = set(decoder.weight.modules())  # computed as their algebra instead
    expected = sum(1 for part in [*encoders, decoder] for conv in part.modules()
                   if isinstance(conv, torch.nn.Conv2d) and conv not in box_filters)
    before = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    channels_innermost = []
    conv2d = F.conv2d

    def record(x, *args, **kwargs):
        channels_innermost.append(x.stride()[1] == 1 and x.shape[-1] > 1)
        return conv2d(x, *args, **kwargs)
    monkeypatch.setattr(F, "conv2d", record)
    ir, vis = synthetic_batch(1, 40, 48, seed=5)
    fuse(ir, vis, model=model, backend="fast")
    assert len(channels_innermost) == expected == 23 and all(channels_innermost)
    assert {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()} == before


def test_fast_crossfuse_gradients_are_the_reference_ones(model):
    """Training through the fast model (channels_last, box filter algebra, fused cross encoder)
    reaches the model's own parameters with the reference's gradients (fp64: only the method differs)."""
    exact = copy.deepcopy(model).double().train()
    ir, vis = (x.double() for x in synthetic_batch(2, 32, 40, seed=6))
    names, parameters = zip(*[(name, p) for name, p in exact.named_parameters() if p.requires_grad])
    reference_grads = torch.autograd.grad(exact(ir, vis).square().mean(), parameters, allow_unused=True)
    fast = FastCrossFuse(exact, "torch", channels_last=True)
    fast_grads = torch.autograd.grad(fast(ir, vis).square().mean(), parameters, allow_unused=True)
    # Against the largest gradient: biases before a training-mode BatchNorm (and the key biases,
    # under the softmax) have gradients that are zero in exact arithmetic, rounding noise here.
    scale = max(g.abs().max().item() for g in reference_grads if g is not None)
    checked = 0
    for name, want, got in zip(names, reference_grads, fast_grads):
        assert (want is None) == (got is None), name
        if want is not None:
            assert (got - want).abs().max().item() <= 1e-9 * scale, name
            checked += 1
    assert checked > 100


def test_fast_backend_on_images(model):
    ir, vis = synthetic_pair(120, 160, np.random.default_rng(3))
    reference = fuse(ir, vis, model=model, backend="reference").astype(int)
    fast = fuse(ir, vis, model=model, backend="fast").astype(int)
    assert np.abs(fast - reference).max() <= 1 and (fast != reference).mean() < 0.01


def test_model_mode_is_restored(model):
    ir, vis = synthetic_batch(1, 32, 32)
    model.train()
    try:
        fuse(ir, vis, model=model)
        assert model.training
    finally:
        model.eval()


def test_numpy_grey_uint8_is_the_tensor_result_rounded(model):
    ir, vis = synthetic_pair(40, 56, seed=4)
    fused = fuse(ir, vis, model=model)
    assert fused.dtype == np.uint8 and fused.shape == (40, 56)
    tensor = fuse(torch.from_numpy(ir).float()[None, None], torch.from_numpy(vis).float()[None, None], model=model)
    np.testing.assert_array_equal(fused, np.clip(np.rint(tensor[0, 0].numpy()), 0, 255).astype(np.uint8))


def test_numpy_channel_axis_of_one(model):
    ir, vis = synthetic_pair(24, 24, seed=5)
    np.testing.assert_array_equal(fuse(ir[..., None], vis[..., None], model=model), fuse(ir, vis, model=model))


def test_colour_visible_keeps_chroma(model):
    ir, grey = synthetic_pair(48, 64, seed=6)
    rng = np.random.default_rng(6)
    vis = np.stack([grey, np.clip(grey.astype(int) + 40, 0, 255), rng.integers(0, 255, grey.shape)], axis=-1)
    vis = vis.astype(np.uint8)
    fused = fuse(ir, vis, model=model)
    assert fused.shape == (48, 64, 3) and fused.dtype == np.uint8
    luma = cv2.cvtColor(vis, cv2.COLOR_BGR2YCrCb)[..., 0]
    fused_luma = fuse(ir, luma, model=model).astype(int)
    fused_ycrcb = cv2.cvtColor(fused, cv2.COLOR_BGR2YCrCb).astype(int)
    vis_ycrcb = cv2.cvtColor(vis, cv2.COLOR_BGR2YCrCb).astype(int)
    # Luminance is the fused one, chroma the visible one, up to the uint8 round trips.
    assert np.abs(fused_ycrcb[..., 0] - fused_luma).mean() < 1.5
    unclipped = (fused_ycrcb[..., 0] > 10) & (fused_ycrcb[..., 0] < 245)
    assert np.abs(fused_ycrcb[..., 1:] - vis_ycrcb[..., 1:])[unclipped].mean() < 1.5


def test_three_channel_infrared_is_greyed(model):
    ir, vis = synthetic_pair(32, 40, seed=7)
    np.testing.assert_array_equal(fuse(np.repeat(ir[..., None], 3, -1), vis, model=model),
                                  fuse(ir, vis, model=model))


def test_uint16_scalings(model):
    ir, vis = synthetic_pair(32, 40, seed=8)
    raw = 7000 + ir.astype(np.uint16) * 3  # a thermal camera's counts in a narrow band
    full = (ir.astype(np.uint16) * 257)
    minmax_result = fuse(raw, vis, model=model)
    stretched = np.rint((raw - raw.min()) / (raw.max() - raw.min()) * 255).astype(np.uint8)
    assert np.abs(minmax_result.astype(int) - fuse(stretched, vis, model=model).astype(int)).max() <= 1
    np.testing.assert_array_equal(fuse(full, vis, model=model, uint16_scaling="full"), fuse(ir, vis, model=model))


BAD_INPUTS = [
    ("size", lambda: (np.zeros((32, 32), np.uint8), np.zeros((32, 40), np.uint8)), "differ in size"),
    ("shape", lambda: (torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 40)), "differ in shape"),
    ("batch", lambda: (torch.zeros(2, 1, 32, 32), torch.zeros(1, 1, 32, 32)), "differ in shape"),
    ("float-array", lambda: (np.zeros((32, 32), np.float64), np.zeros((32, 32), np.uint8)),
     "ir must be a uint8 or uint16 image, got dtype float64"),
    ("int-array", lambda: (np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.int32)),
     "vis must be a uint8 or uint16 image, got dtype int32"),
    ("int-tensor", lambda: (torch.zeros(1, 1, 32, 32, dtype=torch.uint8), torch.zeros(1, 1, 32, 32)),
     "ir must be a floating-point tensor"),
    ("nan", lambda: (torch.zeros(1, 1, 32, 32), torch.full((1, 1, 32, 32), float("nan"))),
     "vis contains NaN or infinite values"),
    ("inf", lambda: (torch.full((1, 1, 32, 32), float("inf")), torch.zeros(1, 1, 32, 32)),
     "ir contains NaN or infinite values"),
    ("empty-array", lambda: (np.zeros((0, 32), np.uint8), np.zeros((0, 32), np.uint8)), "ir is empty"),
    ("empty-tensor", lambda: (torch.zeros(0, 1, 32, 32), torch.zeros(0, 1, 32, 32)), "ir is empty"),
    ("small-array", lambda: (np.zeros((7, 32), np.uint8), np.zeros((7, 32), np.uint8)), "at least 8 x 8"),
    ("small-tensor", lambda: (torch.zeros(1, 1, 32, 5), torch.zeros(1, 1, 32, 5)), "at least 8 x 8"),
    ("channels-tensor", lambda: (torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)), r"\[B, 1, H, W\]"),
    ("ndim-tensor", lambda: (torch.zeros(32, 32), torch.zeros(32, 32)), r"\[B, 1, H, W\]"),
    ("four-channels", lambda: (np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8)), "BGR"),
    ("mixed", lambda: (np.zeros((32, 32), np.uint8), torch.zeros(1, 1, 32, 32)), "must both be torch tensors, both numpy arrays or both lists"),
    ("list", lambda: ([[0] * 32] * 32, [[0] * 32] * 32), "lists of images must hold numpy arrays"),
]


@pytest.mark.parametrize("make,message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs(model, make, message):
    ir, vis = make()
    with pytest.raises(ValueError, match=message):
        fuse(ir, vis, model=model)


def test_bad_arguments(model):
    ir, vis = synthetic_batch(1, 16, 16)
    with pytest.raises(ValueError, match="unknown backend 'triton'; available: auto, reference, fast"):
        fuse(ir, vis, model=model, backend="triton")
    with pytest.raises(ValueError, match="unknown uint16_scaling"):
        fuse(ir, vis, model=model, uint16_scaling="log")
    with pytest.raises(ValueError, match="model must be 'released', a CrossFuse"):
        fuse(ir, vis, model=object())


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_fuse_never_changes_a_training_model(model, backend, monkeypatch):
    """A model in training mode, shared by threads: each call runs with eval semantics on the model's
    own tensors (the result equals an eval-mode model's), and the model keeps its mode and its
    BatchNorm statistics; its mode is never even switched and back (which raced between threads)."""
    import threading

    trainee = copy.deepcopy(model).train()
    own = {id(module) for module in trainee.modules()}
    switched = []
    train = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: (
        switched.append(self) if id(self) in own else None) or train(self, mode))
    before = {name: buffer.clone() for name, buffer in trainee.named_buffers()}
    ir, vis = synthetic_batch(1, 32, 40, seed=9)
    expected = fuse(ir, vis, model=copy.deepcopy(model).eval(), backend=backend)
    results, errors = [], []

    def work():
        try:
            for _ in range(2):
                results.append(fuse(ir, vis, model=trainee, backend=backend))
        except Exception as error:  # reported below, with the thread's result count
            errors.append(error)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 6 and not switched
    assert all(torch.equal(result, expected) for result in results)
    assert all(module.training for module in trainee.modules())
    assert all(torch.equal(buffer, before[name]) for name, buffer in trainee.named_buffers())


def test_far_out_of_range_tensors_are_refused(model):
    ir, vis = synthetic_batch(1, 16, 16)
    with pytest.raises(ValueError, match="ir has values from .* fuse takes images on 0..255"):
        fuse(ir * 1e20, vis, model=model)
    with pytest.raises(ValueError, match="vis has values from -"):
        fuse(ir, vis - vis.max() - 2, model=model)
    fuse(ir.clamp(0, 255) * (256 / 255), vis, model=model)  # within one level of slack: accepted
