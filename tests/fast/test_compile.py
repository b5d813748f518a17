"""The fast networks under ``torch.compile(fullgraph=True)``: inference and a training step of each
stage, with the eager answer (CPU, the PyTorch twins; the device run compiles them on CUDA)."""
import copy

import pytest
import torch
from utils import GPU

from crossfuse_fast import CrossFuse
from crossfuse_fast.fast import FastAutoEncoder, FastFusionNet
from crossfuse_fast.losses import autoencoder_loss_terms, fusion_loss_terms
from crossfuse_fast.reference import AutoEncoder, FusionNet

# Dynamo's whole-graph capture and AOT autograd's backward, without Inductor's C++ code generation
# (about a minute for the whole model on two cores); Inductor is tested below on the part that
# needed a change for it, and on CUDA by the device run.
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(seed, size=(32, 48), batch=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, *size, generator=generator) * 255 for _ in range(2)]


def test_the_fast_model_compiles_whole_for_inference(model):
    """``model.fast()`` (public) compiles with ``fullgraph=True`` and gives the eager result; the
    derived-weight cache no longer stops the trace (it read ``is_inference``)."""
    network = model.fast("torch")
    ir, vis = _pair(31)
    with torch.no_grad():
        want = network(ir, vis)
        got = torch.compile(network, fullgraph=True, backend=BACKEND)(ir, vis)
    assert (got - want).abs().max().item() < 1e-3


def test_the_fast_model_needs_triton():
    """Where Triton is missing, ``fast()`` says so (the same check as ``fuse(backend="fast")``)."""
    from crossfuse_fast import backends
    real = backends.fast_available
    backends.fast_available = lambda: False
    try:
        with pytest.raises(ValueError, match="needs Triton"):
            CrossFuse().fast()
    finally:
        backends.fast_available = real


def test_inductor_compiles_the_decoders_chained_upsamplings(model):
    """Inductor (not only the capture): two upsampled convolutions in a row, whose phases the eager
    twin writes by strided slices, failed there ("vr must not be None"); compiled, they give the
    eager result."""
    decoder = model.fast("torch").fusion.decoder_fusion
    y = torch.randn(1, 128, 2, 3)
    with torch.no_grad():
        got = torch.compile(decoder.upsampled, fullgraph=True)(y)
        assert (got - decoder.upsampled(y)).abs().max().item() < 1e-4


def _gradients(loss, parameters):
    return torch.autograd.grad(loss, parameters, allow_unused=True)


def _assert_same(got, want, tolerance):
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert (g - w).abs().max().item() <= tolerance * max(w.abs().max().item(), 1e-30)


def test_a_stage_one_training_step_compiles():
    """Stage 1: the compiled fast autoencoder's loss and every parameter's gradient are the eager
    ones (training mode)."""
    torch.manual_seed(8)
    autoencoder = AutoEncoder().train()
    network = FastAutoEncoder(autoencoder, kernel_backend="torch")
    images = torch.rand(2, 1, 32, 32) * 255
    parameters = list(autoencoder.parameters())
    want = autoencoder_loss_terms(network, images)["loss"]
    got = autoencoder_loss_terms(torch.compile(network, fullgraph=True, backend=BACKEND), images)["loss"]
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    _assert_same(_gradients(got, parameters), _gradients(want, parameters), 1e-4)


def test_a_stage_two_training_step_compiles(model):
    """Stage 2: the compiled fast fusion network (BatchNorms on the batch's statistics, the cross
    encoder on whole deep maps) gives the eager loss and gradients, and updates the BatchNorms'
    running statistics as eager does."""
    torch.manual_seed(9)
    fusion = FusionNet().train()
    eager_fusion = copy.deepcopy(fusion)
    encoders = [FastAutoEncoder(copy.deepcopy(a).eval(), kernel_backend="torch")
                for a in (model.ir_autoencoder, model.vis_autoencoder)]
    ir, vis = _pair(32, size=(32, 32), batch=2)
    want = fusion_loss_terms(FastFusionNet(eager_fusion, "torch"), *encoders, ir, vis)["loss"]
    compiled = torch.compile(FastFusionNet(fusion, "torch"), fullgraph=True, backend=BACKEND)
    got = fusion_loss_terms(compiled, *encoders, ir, vis)["loss"]
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    trainable = [p for p in fusion.parameters() if p.requires_grad]
    eager_trainable = [p for p in eager_fusion.parameters() if p.requires_grad]
    _assert_same(_gradients(got, trainable), _gradients(want, eager_trainable), 1e-3)
    for got_buffer, want_buffer in zip(fusion.buffers(), eager_fusion.buffers()):
        assert torch.allclose(got_buffer.float(), want_buffer.float(), rtol=1e-5, atol=1e-6)


@GPU
def test_inductor_compiles_the_fast_model_on_cuda(model):
    """On CUDA (the device run): ``torch.compile(model.fast(), fullgraph=True)`` with Inductor, the
    Triton kernels as opaque ops, gives the eager result; and a stage-2 training step's gradients."""
    model = copy.deepcopy(model).cuda()
    network = model.fast()
    ir, vis = (x.cuda() for x in _pair(33, size=(64, 96)))
    with torch.no_grad():
        want = network(ir, vis)
        got = torch.compile(network, fullgraph=True)(ir, vis)
    assert (got - want).abs().max().item() < 1e-2
    fusion = FusionNet().cuda().train()
    eager_fusion = copy.deepcopy(fusion)
    encoders = [FastAutoEncoder(a) for a in (model.ir_autoencoder, model.vis_autoencoder)]
    ir, vis = (x.cuda() for x in _pair(34, size=(32, 32), batch=2))
    want = fusion_loss_terms(FastFusionNet(eager_fusion), *encoders, ir, vis)["loss"]
    got = fusion_loss_terms(torch.compile(FastFusionNet(fusion), fullgraph=True), *encoders, ir, vis)["loss"]
    assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item())
    _assert_same(_gradients(got, [p for p in fusion.parameters() if p.requires_grad]),
                 _gradients(want, [p for p in eager_fusion.parameters() if p.requires_grad]), 1e-2)
