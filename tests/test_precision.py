"""``fuse(precision=...)``: TF32's switches, the 16-bit copy of the weights, what stays in fp32, and the
error against fp32 (bounds twice what was measured on generated pairs with this suite's model)."""
import copy

import pytest
import torch
from conftest import weights
from utils import GPU, LaunchRecorder

from crossfuse_fast import fuse, kernels
from crossfuse_fast.cli import main
from crossfuse_fast.kernels import implicit_gemm_conv
from crossfuse_fast.precision import (CONDITIONING_LIMIT, PRECISIONS, SixteenBitFallback, deep_weighting_conditioning,
                                      model_in, sixteen_bit_copy, tf32_allowed)
from crossfuse_fast.reference.fusion import SourceWeights

# Largest and mean |fused - fp32 reference| in grey levels: twice the measured 2.16 / 0.48 (bf16) and
# 0.26 / 0.06 (fp16) on two 2-pair batches of uniform noise, 64 x 80 and 120 x 96, on the CPU.
ERROR_BOUNDS = {"bf16": (4.5, 1.0), "fp16": (0.55, 0.13)}


def _pairs(seed, size=(64, 80), batch=2, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, 1, *size, generator=generator) * 255).to(device) for _ in range(2)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sixteen_bits_within_the_measured_error(model, precision):
    """A float32 image within the bounds of fp32; the stretch ran in fp32 (the values are not all
    16-bit numbers); the model itself is left in fp32."""
    before = copy.deepcopy(model.state_dict())
    ir, vis = _pairs(40)
    reference = fuse(ir, vis, model=model, backend="reference")
    got = fuse(ir, vis, model=model, backend="fast", precision=precision)
    assert got.dtype == torch.float32 and got.shape == reference.shape
    error = (got - reference).abs()
    largest, mean = ERROR_BOUNDS[precision]
    assert error.max().item() <= largest and error.mean().item() <= mean
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    assert (got != got.to(dtype).float()).float().mean().item() > 0.5
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_tf32_is_fp32_on_a_cpu_and_its_switches_are_put_back(model):
    ir, vis = _pairs(41, batch=1)
    assert torch.equal(fuse(ir, vis, model=model, backend="fast", precision="tf32"),
                       fuse(ir, vis, model=model, backend="fast"))
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with tf32_allowed("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_convolution_kernels_follow_pytorchs_tf32_switch(monkeypatch):
    """``tf32=None`` (what the fast modules pass) runs fp32 dots in TF32 exactly when PyTorch's GEMMs
    would, so that ``precision="tf32"`` reaches the kernels; an explicit value wins."""
    recorder = LaunchRecorder(implicit_gemm_conv._conv2d_fwd_kernel)
    monkeypatch.setattr(implicit_gemm_conv, "_conv2d_fwd_kernel", recorder)
    x, weight = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 3, 3)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for switch, tf32, expected in ((False, None, "ieee"), (True, None, "tf32"), (True, False, "ieee")):
            torch.backends.cuda.matmul.allow_tf32 = switch
            kernels.conv2d(x, weight, tf32=tf32)
            assert recorder.launches[-1][1]["INPUT_PRECISION"] == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_the_sixteen_bit_copy(model):
    """BatchNorms (folded in fp32) and the fixed box filters stay fp32, the rest is 16 bits; the copy
    is made once and made again after a weight changes."""
    copied = sixteen_bit_copy(model, torch.bfloat16)
    fp32_modules = {id(m) for m in copied.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for box_filters in (m for m in copied.modules() if isinstance(m, SourceWeights)):
        fp32_modules.update(id(m) for m in box_filters.modules())
    for module in copied.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.is_floating_point():
                assert tensor.dtype == (torch.float32 if id(module) in fp32_modules else torch.bfloat16)
    owner = copy.deepcopy(model)
    first = model_in(owner, "bf16")
    assert model_in(owner, "bf16") is first and model_in(owner, "fp32") is owner
    with torch.no_grad():
        owner.fusion.decoder_fusion.conv_last.conv2d[0].weight.add_(1.0)
    assert model_in(owner, "bf16") is not first


def test_the_weighting_twins_compute_sixteen_bits_in_fp32():
    """The decoder's weighted sums of 16-bit maps are the fp32 computation rounded once."""
    torch.manual_seed(3)
    base, ir, vis = (torch.rand(1, 32, 6, 7) for _ in range(3))
    for op in (kernels.deep_weighted_sum_torch, kernels.shallow_weighted_sum_torch):
        wide = op(*(x.bfloat16().float() for x in (base, ir, vis)), 0.9)
        assert torch.equal(op(base.bfloat16(), ir.bfloat16(), vis.bfloat16(), 0.9), wide.bfloat16())


def test_names_bad_precisions(model):
    ir, vis = _pairs(42, size=(16, 16), batch=1)
    with pytest.raises(ValueError, match="unknown precision 'fp8'; available: " + ", ".join(PRECISIONS)):
        fuse(ir, vis, model=model, precision="fp8")
    with pytest.raises(ValueError, match="precision 'bf16' runs on the fast path"):
        fuse(ir, vis, model=model, backend="reference", precision="bf16")


def test_the_command_refuses_sixteen_bits_on_the_reference_before_any_work(trained, tmp_path, capsys):
    pairs = trained / "pairs"
    args = ["fuse", "--ir", str(pairs / "ir"), "--vis", str(pairs / "vis"), "--out", str(tmp_path / "out"),
            "--precision", "bf16", "--backend", "reference", *weights(trained)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--precision bf16 runs on the fast path" in error
    assert not (tmp_path / "out").exists()
    args[args.index("bf16")] = "fp16"
    args[args.index("reference")] = "fast"
    assert main(args) == 0 and len(list((tmp_path / "out").iterdir())) == 2


@GPU
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_sixteen_bits_on_the_gpu_within_the_measured_error(model, precision):
    """On CUDA (the device run), the Triton kernels in 16 bits: within the same bounds."""
    model = copy.deepcopy(model).cuda()
    ir, vis = _pairs(40, device="cuda")
    reference = fuse(ir, vis, model=model, backend="reference")
    error = (fuse(ir, vis, model=model, backend="fast", precision=precision) - reference).abs()
    largest, mean = ERROR_BOUNDS[precision]
    assert error.max().item() <= largest and error.mean().item() <= mean


def test_the_conditioning_of_the_deep_weighting():
    """1 where the two activities share a sign, their sum over their difference where they nearly
    cancel, per image."""
    ir = torch.ones(2, 4, 3, 5)
    vis = torch.ones(2, 4, 3, 5)
    vis[1] = -0.999
    got = deep_weighting_conditioning(ir, vis)
    assert got[0].item() == pytest.approx(1.0) and got[1].item() == pytest.approx(1.999 / 0.001, rel=1e-3)


@pytest.mark.parametrize("tile", [None, 16], ids=["whole", "tiles"])
def test_an_ill_conditioned_image_is_fused_again_in_fp32(model, monkeypatch, tile):
    """An image whose conditioning is over the limit is fused in fp32 (the fp32 call's very bits),
    the others stay 16-bit, and a SixteenBitFallback names it; so in tiles."""
    from crossfuse_fast import tiling
    from crossfuse_fast.fast import model as fast_model

    ir, vis = _pairs(43, size=(32, 40))
    sixteen = fuse(ir, vis, model=model, backend="fast", precision="bf16", tile=tile)
    calls = []

    def second_call_ill_conditioned(ir_deep, vis_deep):
        """On a CPU the images of a call run one at a time: the second is image 1."""
        calls.append(1)
        return torch.tensor([1.0 if len(calls) % 2 else 2 * CONDITIONING_LIMIT])

    for owner in (fast_model, tiling):
        monkeypatch.setattr(owner, "deep_weighting_conditioning", second_call_ill_conditioned)
    with pytest.warns(SixteenBitFallback, match="1 of 2 images fused in fp32 instead of bf16") as caught:
        got = fuse(ir, vis, model=model, backend="fast", precision="bf16", tile=tile)
    assert caught[0].message.images == [1]
    assert torch.equal(got[0], sixteen[0])
    assert torch.equal(got[1], fuse(ir[1:], vis[1:], model=model, backend="fast", tile=tile)[0])


def test_the_command_names_each_pair_fused_in_fp32(trained, tmp_path, capsys, monkeypatch):
    from crossfuse_fast.fast import model as fast_model
    monkeypatch.setattr(fast_model, "deep_weighting_conditioning",
                        lambda ir_deep, vis_deep: torch.full((ir_deep.shape[0],), 2 * CONDITIONING_LIMIT))
    pairs = trained / "pairs"
    assert main(["fuse", "--ir", str(pairs / "ir"), "--vis", str(pairs / "vis"), "--out", str(tmp_path / "out"),
                 "--precision", "bf16", "--backend", "fast", *weights(trained)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "fused in fp32" in line]
    assert len(notes) == 2 and all(line.startswith("crossfuse fuse: ") and "ill-conditioned" in line
                                   for line in notes)
