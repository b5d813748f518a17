"""The benchmark cases and the providers that run them.

Providers (each added as it exists):

- ``eager``: the reference (``crossfuse_fast.reference``) as it is, all windows and images of
  a batch in one call.
- ``compile``: ``torch.compile`` of the same reference code (static shapes, compiled per case).
- ``released``: the reference run the way the released code runs it: one image at a time and
  one 32 x 32 window at a time in a Python loop, with the roll. Only where that differs from
  ``eager`` (fusion end to end, the cross encoder).
- ``sdpa``: ``scaled_dot_product_attention`` on negated queries (attention alone).
- ``api``: ``fuse()`` as users call it (reference backend; on a CPU it runs a batch's images
  one at a time), for the end-to-end cases.
- ``compile-graphs`` / ``fast-triton-graphs``: ``torch.compile(mode="reduce-overhead")`` of the
  reference or of the Triton fast path, which replays CUDA graphs: what is left once Python
  and launch overhead are gone (the cross encoder, on a GPU only).
- ``fast-torch`` / ``fast-triton``: the fast path (``crossfuse_fast.fast``) with the PyTorch
  twins and convolutions, or the Triton kernels (``fuse(backend="fast")`` end to end, with the
  convolutions in channels_last on a CPU; the encoder and the fusion decoder alone; the cross
  encoder on windows, on whole deep maps and in training; attention alone for ``triton``).
  Triton providers exist on a GPU only. End to end, for the encoder and in the training steps
  (stage 1: the fast autoencoder, no cross encoder) a CPU also runs ``fast-torch-nchw`` (the
  convolutions in NCHW) and a GPU ``fast-torch-nhwc`` (PyTorch's convolutions in channels_last,
  cuDNN's NHWC kernels, against which the Triton convolutions are read).

Weights are random (seeded) with non-trivial BatchNorm statistics: speed does not depend on
the values, and the released files cannot be downloaded here.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crossfuse_fast import CrossFuse, fuse, kernels
from crossfuse_fast.fast import FastAutoEncoder, FastCrossEncoder, FastCrossFuse, FastFusionDecoder, FastFusionNet
from crossfuse_fast.losses import autoencoder_loss, fusion_loss, fusion_loss_terms
from crossfuse_fast.reference import AutoEncoder, FusionNet, attention_ref
from crossfuse_fast.reference.functional import WINDOW
from crossfuse_fast.synthetic import randomize_batch_norms

from .flops import ADAM_PARAMETER_TRANSFERS, count_forward, parameter_bytes, tensor_bytes

HEADS, TOKENS, HEAD_DIM = 16, 256, 32


@dataclass
class Case:
    """One workload: inputs made outside the timed region, and a callable per provider."""

    name: str
    group: str
    flops: int
    min_bytes: int
    make_inputs: Callable[[int], tuple]
    providers: dict[str, Callable[..., object]]
    quick: bool = False
    notes: str = ""


def _images(batch: int, height: int, width: int, device, dtype) -> Callable[[int], tuple]:
    def make(seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        ir = torch.rand(batch, 1, height, width, generator=generator) * 255
        vis = torch.rand(batch, 1, height, width, generator=generator) * 255
        return ir.to(device, dtype), vis.to(device, dtype)
    return make


def released_style_fuse(model: CrossFuse, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """The released inference loop: image by image, window by window, roll on
    (docs/model.md#windows-and-tokens, docs/model.md#cross-encoder)."""
    outputs = []
    for index in range(ir.shape[0]):
        ir_shallow, ir_deep = model.ir_autoencoder.encode(ir[index:index + 1])
        vis_shallow, vis_deep = model.vis_autoencoder.encode(vis[index:index + 1])
        fused = released_style_cross_encoder(model.fusion.cross_atten_block, ir_deep, vis_deep)
        outputs.append(model.fusion.decoder_fusion(fused, ir_deep, ir_shallow, vis_deep, vis_shallow))
    return torch.cat(outputs)


def released_style_cross_encoder(encoder: torch.nn.Module, ir_deep: torch.Tensor,
                                 vis_deep: torch.Tensor) -> torch.Tensor:
    """Pad the deep maps, run the cross encoder on one window at a time, put them back."""
    height, width = ir_deep.shape[-2:]
    pad = (0, -width % WINDOW, 0, -height % WINDOW)
    ir_padded, vis_padded = F.pad(ir_deep, pad, mode="reflect"), F.pad(vis_deep, pad, mode="reflect")
    fused = torch.empty_like(ir_padded)
    for top in range(0, ir_padded.shape[-2], WINDOW):
        for left in range(0, ir_padded.shape[-1], WINDOW):
            window = (slice(None), slice(None), slice(top, top + WINDOW), slice(left, left + WINDOW))
            fused[window] = encoder(ir_padded[window], vis_padded[window], shift=True)
    return fused[..., :height, :width]


def _fast_providers(make: Callable[[str, bool | None], Callable], on_gpu: bool) -> dict[str, Callable]:
    """The fast path as users get it (``fast-torch`` on a CPU, ``fast-triton`` on a GPU) and beside
    it, from ``make(kernel_backend, channels_last)`` (``channels_last=None``: the device's default):
    on a CPU the convolutions in NCHW (``fast-torch-nchw``); on a GPU PyTorch's convolutions and the
    kernels' twins instead of the Triton kernels, in NCHW (``fast-torch``) and in channels_last
    (``fast-torch-nhwc``: cuDNN's NHWC convolutions)."""
    if on_gpu:
        return {"fast-triton": make("triton", None), "fast-torch": make("torch", None),
                "fast-torch-nhwc": make("torch", True)}
    return {"fast-torch": make("torch", None), "fast-torch-nchw": make("torch", False)}


def _precision_providers(model: CrossFuse, wanted: bool) -> dict[str, Callable]:
    """``fuse(..., precision=p)`` on the fp32 model (``api-tf32``, ``api-bf16``, ``api-fp16``; on a
    GPU, where a repeated shape replays its CUDA graph, as for ``api``): the precisions as users
    ask for them, beside the fp32 providers of the same run."""
    if not wanted:
        return {}
    return {f"api-{precision}": (lambda ir, vis, precision=precision: fuse(ir, vis, model=model, precision=precision))
            for precision in ("tf32", "bf16", "fp16")}


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _graphed(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False, mode="reduce-overhead")


def _encoder_providers(reference: Callable, fast: Callable[[str], Callable], on_gpu: bool) -> dict[str, Callable]:
    """The cross encoder's providers but ``released``: the reference, compiled, and the fast path."""
    providers = {"eager": _inference(reference), "compile": _inference(_compiled(reference)),
                 "fast-torch": _inference(fast("torch"))}
    if on_gpu:
        providers.update({"compile-graphs": _inference(_graphed(reference)),
                          "fast-triton": _inference(fast("triton")),
                          "fast-triton-graphs": _inference(_graphed(fast("triton")))})
    return providers


def _inference(fn: Callable) -> Callable:
    def run(*inputs):
        with torch.inference_mode():
            return fn(*inputs)
    return run


def build_cases(device: torch.device, dtype: torch.dtype, providers: list[str]) -> list[Case]:
    """Every case of the harness, for the given device, dtype and providers."""
    torch.manual_seed(0)
    model = randomize_batch_norms(CrossFuse()).eval().to(device, dtype)
    meta = CrossFuse().eval().to("meta", dtype)
    weights_bytes = parameter_bytes(model.ir_autoencoder.fea_encoder1) * 2 + parameter_bytes(model.fusion)
    on_gpu = device.type == "cuda"
    cases: list[Case] = []

    def keep(candidates: dict[str, Callable]) -> dict[str, Callable]:
        return {name: fn for name, fn in candidates.items() if name in providers}

    for height, width, tag in ((256, 256, "256x256"), (480, 640, "480x640"), (1024, 1280, "1024x1280")):
        for batch in (1, 8, 32) if on_gpu and tag == "480x640" else (1, 8):
            make = _images(batch, height, width, device, dtype)
            shapes = [torch.empty(batch, 1, height, width, device="meta", dtype=dtype)] * 2
            count = count_forward(meta, lambda: meta(*shapes))
            windows = batch * math.ceil(height / 8 / WINDOW) * math.ceil(width / 8 / WINDOW)
            cases.append(Case(
                name=f"fuse {tag} b{batch}", group="fuse end to end", flops=count.total,
                min_bytes=3 * tensor_bytes(shapes[0]) + weights_bytes, make_inputs=make,
                providers=keep({"eager": _inference(model), "compile": _inference(_compiled(model)),
                                "released": _inference(lambda ir, vis: released_style_fuse(model, ir, vis)),
                                "api": lambda ir, vis: fuse(ir, vis, model=model),
                                **_precision_providers(model, on_gpu and dtype == torch.float32),
                                **_fast_providers(lambda backend, layout: _inference(
                                    FastCrossFuse(model, backend, layout)), on_gpu)}),
                quick=batch == 1 and height <= 480, notes=f"{windows} windows"))

    for windows in (6, 48, 384):
        def make_windows(seed: int, windows=windows) -> tuple:
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(2, windows, 128, WINDOW, WINDOW, generator=generator)
            return tuple(x.to(device, dtype).unbind(0))
        encoder = model.fusion.cross_atten_block
        meta_encoder = meta.fusion.cross_atten_block
        shape = torch.empty(windows, 128, WINDOW, WINDOW, device="meta", dtype=dtype)
        count = count_forward(meta_encoder, lambda: meta_encoder(shape, shape))
        cases.append(Case(
            name=f"cross encoder w{windows}", group="cross encoder", flops=count.total,
            min_bytes=3 * tensor_bytes(shape) + parameter_bytes(encoder), make_inputs=make_windows,
            providers=keep({**_encoder_providers(encoder, lambda backend, encoder=encoder:
                                                 FastCrossEncoder(encoder, backend), on_gpu),
                            "released": _inference(lambda ir, vis, encoder=encoder:
                                                   released_style_cross_encoder(encoder, ir, vis))}),
            quick=windows == 6))

        if windows == 6:
            cases.append(_deep_maps_case(model, meta, device, dtype, keep, on_gpu))

        cases.append(_mlp_case(model, windows, device, dtype, keep, on_gpu))

        def make_qkv(seed: int, windows=windows) -> tuple:
            generator = torch.Generator().manual_seed(seed)
            qkv = torch.randn(3, windows, HEADS, TOKENS, HEAD_DIM, generator=generator)
            return tuple(qkv.to(device, dtype).unbind(0))
        q = torch.empty(windows, HEADS, TOKENS, HEAD_DIM, dtype=dtype)
        cases.append(Case(
            name=f"attention w{windows}", group="attention", flops=2 * 2 * windows * HEADS * TOKENS ** 2 * HEAD_DIM,
            min_bytes=4 * tensor_bytes(q), make_inputs=make_qkv,
            providers=keep({
                "eager": _inference(lambda q, k, v: attention_ref(q, k, v, reverse=True)),
                "compile": _inference(_compiled(lambda q, k, v: attention_ref(q, k, v, reverse=True))),
                "sdpa": _inference(lambda q, k, v: F.scaled_dot_product_attention(-q, k, v)),
                **({"triton": _inference(lambda q, k, v: kernels.attention(q, k, v, reverse=True))}
                   if on_gpu else {})}),
            quick=windows == 6, notes="reversed softmax, 16 heads of 32, 256 tokens"))

    height, width = 480, 640
    encoder = model.ir_autoencoder
    image = torch.empty(1, 1, height, width, device="meta", dtype=dtype)
    count = count_forward(meta.ir_autoencoder, lambda: meta.ir_autoencoder.encode(image))
    cases.append(Case(
        name="encoder 480x640 b1", group="encoder", flops=count.total,
        min_bytes=tensor_bytes(image) * (1 + 32 + 128 / 64) + parameter_bytes(encoder.fea_encoder1),
        make_inputs=lambda seed: _images(1, height, width, device, dtype)(seed)[:1],
        providers=keep({"eager": _inference(encoder.encode), "compile": _inference(_compiled(encoder.encode)),
                        **_fast_providers(lambda backend, layout: _inference(
                            FastAutoEncoder(encoder, layout, backend).encode), on_gpu)}),
        quick=True))

    def make_decoder_inputs(seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        deep = [torch.randn(1, 128, height // 8, width // 8, generator=generator) for _ in range(3)]
        shallow = [torch.randn(1, 32, height, width, generator=generator) for _ in range(2)]
        return tuple(t.to(device, dtype) for t in (deep[0], deep[1], shallow[0], deep[2], shallow[1]))
    decoder = model.fusion.decoder_fusion
    shapes = [t.to("meta") for t in make_decoder_inputs(0)]
    count = count_forward(meta.fusion.decoder_fusion, lambda: meta.fusion.decoder_fusion(*shapes))
    cases.append(Case(
        name="fusion decoder 480x640 b1", group="fusion decoder", flops=count.total,
        min_bytes=tensor_bytes(*shapes) + tensor_bytes(image) + parameter_bytes(decoder),
        make_inputs=make_decoder_inputs,
        providers=keep({"eager": _inference(decoder), "compile": _inference(_compiled(decoder)),
                        "fast-torch": _inference(FastFusionDecoder(decoder, "torch")),
                        **({"fast-triton": _inference(FastFusionDecoder(decoder, "triton"))} if on_gpu else {})}),
        quick=True, notes="box filters run as dense convs (reference) or as their algebra (fast)"))

    cases.extend(_training_cases(device, dtype, keep))
    cases.append(_cross_encoder_training_case(model.fusion.cross_atten_block, meta, device, dtype, keep, on_gpu))
    return cases


def _mlp_case(model: CrossFuse, windows: int, device: torch.device, dtype: torch.dtype, keep: Callable,
              on_gpu: bool) -> Case:
    """An MLP's ``fc1`` with its GELU on every token of ``windows`` windows: the model's widest output."""
    fc1 = model.fusion.cross_atten_block.cross_atten_block.cross_atten1.blocks[0].mlp.fc1
    tokens = windows * TOKENS

    def make(seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(tokens, fc1.in_features, generator=generator).to(device, dtype),)

    def reference(x):
        return F.gelu(F.linear(x, fc1.weight, fc1.bias))
    x = torch.empty(tokens, fc1.in_features, dtype=dtype)
    y = torch.empty(tokens, fc1.out_features, dtype=dtype)
    return Case(
        name=f"mlp fc1 w{windows}", group="cross encoder", flops=2 * tokens * fc1.in_features * fc1.out_features,
        min_bytes=tensor_bytes(x, y) + parameter_bytes(fc1), make_inputs=make,
        providers=keep({"eager": _inference(reference), "compile": _inference(_compiled(reference)),
                        "fast-torch": _inference(lambda x: kernels.linear_gelu_torch(x, fc1.weight, fc1.bias)),
                        **({"fast-triton": _inference(lambda x: kernels.linear_gelu(x, fc1.weight, fc1.bias))}
                           if on_gpu else {})}),
        quick=False, notes="fused GEMM + bias + GELU in 16 bits; cuBLAS + bias_gelu in fp32")


def _deep_maps_case(model: CrossFuse, meta: CrossFuse, device: torch.device, dtype: torch.dtype, keep: Callable,
                    on_gpu: bool) -> Case:
    """``fuse_deep`` on a 480 x 640 image's deep maps (60 x 80: six windows, padded): the windows,
    patches and padding as copies (reference) or as the fast path's addressing."""
    height, width = 480 // 8, 640 // 8

    def make(seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(2, 1, 128, height, width, generator=generator).to(device, dtype).unbind(0))
    fusion, encoder = model.fusion, model.fusion.cross_atten_block
    shape = torch.empty(1, 128, height, width, device="meta", dtype=dtype)
    count = count_forward(meta.fusion, lambda: meta.fusion.fuse_deep(shape, shape))
    return Case(
        name="deep maps 480x640 b1", group="cross encoder", flops=count.total,
        min_bytes=3 * tensor_bytes(shape) + parameter_bytes(encoder), make_inputs=make,
        providers=keep({**_encoder_providers(fusion.fuse_deep,
                                             lambda backend: FastCrossEncoder(encoder, backend).fuse_deep, on_gpu),
                        "released": _inference(lambda ir, vis: released_style_cross_encoder(encoder, ir, vis))}),
        quick=True, notes="6 windows, cut and put back")


def _cross_encoder_training_case(encoder: torch.nn.Module, meta: CrossFuse, device: torch.device,
                                 dtype: torch.dtype, keep: Callable, on_gpu: bool) -> Case:
    """Forward and backward of the cross encoder on stage 2's windows (8 crops of 256 x 256: 8 windows).

    The deep maps come from frozen encoders, so only the parameters get gradients.
    """
    windows = 8

    def make(seed: int) -> tuple:
        generator = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(2, windows, 128, WINDOW, WINDOW, generator=generator).to(device, dtype).unbind(0))

    def step(forward: Callable) -> Callable:
        def run(ir, vis):
            encoder.zero_grad(set_to_none=True)
            forward(ir, vis).sum().backward()
        return run

    meta_encoder = meta.fusion.cross_atten_block
    shape = torch.empty(windows, 128, WINDOW, WINDOW, device="meta", dtype=dtype)
    count = count_forward(meta_encoder, lambda: meta_encoder(shape, shape, shift=False))
    return Case(
        name="train cross encoder w8", group="cross encoder training", flops=3 * count.total,
        min_bytes=2 * tensor_bytes(shape) + 3 * parameter_bytes(encoder), make_inputs=make,
        providers=keep({"eager": step(lambda ir, vis: encoder(ir, vis, shift=False)),
                        "compile": step(_compiled(lambda ir, vis: encoder(ir, vis, shift=False))),
                        "fast-torch": step(FastCrossEncoder(encoder, "torch")),
                        **({"fast-triton": step(FastCrossEncoder(encoder, "triton"))} if on_gpu else {})}),
        quick=False, notes="forward + backward to the parameters; FLOPs 3 x forward")


def _training_cases(device: torch.device, dtype: torch.dtype, keep: Callable) -> list[Case]:
    """One optimiser step of each stage on 256 x 256 crops (stage 1 batch 2, stage 2 batch 8)."""
    cases = []
    on_gpu = device.type == "cuda"
    torch.manual_seed(1)
    autoencoder = AutoEncoder().to(device, dtype).train()
    meta_autoencoder = AutoEncoder().to("meta", dtype)
    images = torch.empty(2, 1, 256, 256, device="meta", dtype=dtype)
    forward = count_forward(meta_autoencoder, lambda: meta_autoencoder(images)).total
    step_bytes = 2 * tensor_bytes(images) + ADAM_PARAMETER_TRANSFERS * parameter_bytes(autoencoder)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=1e-4, weight_decay=0.9)

    def stage1_step(loss_fn: Callable, network: torch.nn.Module = autoencoder) -> Callable:
        def step(batch):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(network, batch).backward()
            optimizer.step()
        return step

    cases.append(Case(
        name="train stage 1 256x256 b2", group="training", flops=3 * forward, min_bytes=step_bytes,
        make_inputs=lambda seed: _images(2, 256, 256, device, dtype)(seed)[:1],
        providers=keep({"eager": stage1_step(autoencoder_loss), "compile": stage1_step(_compiled(autoencoder_loss)),
                        **_fast_providers(lambda backend, layout: stage1_step(
                            autoencoder_loss, FastAutoEncoder(autoencoder, layout, backend)), on_gpu)}),
        quick=True, notes="forward + backward + Adam; MS-SSIM not counted"))

    encoders = [AutoEncoder().to(device, dtype).eval().requires_grad_(False) for _ in range(2)]
    fusion = FusionNet().to(device, dtype).train()
    meta_fusion = FusionNet().to("meta", dtype)
    deep = torch.empty(8, 128, 32, 32, device="meta", dtype=dtype)
    shallow = torch.empty(8, 32, 256, 256, device="meta", dtype=dtype)
    crops = torch.empty(8, 1, 256, 256, device="meta", dtype=dtype)
    encoder_flops = 2 * count_forward(meta_autoencoder, lambda: meta_autoencoder.encode(crops)).total
    fusion_flops = count_forward(meta_fusion, lambda: meta_fusion(deep, shallow, deep, shallow, shift=False)).total
    trainable = [p for p in fusion.parameters() if p.requires_grad]
    fusion_optimizer = torch.optim.Adam(trainable, lr=1e-3, weight_decay=0.9)

    def stage2_step(loss_fn: Callable, network: torch.nn.Module = fusion, encoders: list = encoders) -> Callable:
        def step(ir, vis):
            fusion_optimizer.zero_grad(set_to_none=True)
            loss_fn(network, encoders[0], encoders[1], ir, vis).backward()
            fusion_optimizer.step()
        return step

    cases.append(Case(
        name="train stage 2 256x256 b8", group="training", flops=encoder_flops + 3 * fusion_flops,
        min_bytes=3 * tensor_bytes(crops) + ADAM_PARAMETER_TRANSFERS * parameter_bytes(fusion, trainable_only=True)
        + 2 * parameter_bytes(encoders[0].fea_encoder1),
        make_inputs=_images(8, 256, 256, device, dtype),
        providers=keep({"eager": stage2_step(fusion_loss), "compile": stage2_step(_compiled(fusion_loss)),
                        **_fast_providers(lambda backend, layout: stage2_step(
                            fusion_loss, FastFusionNet(fusion, backend),
                            [FastAutoEncoder(e, layout, backend) for e in encoders]), on_gpu)}),
        quick=False, notes="frozen encoders forward + fusion forward, backward, Adam"))

    def make_cached(seed: int) -> tuple:
        ir, vis = _images(8, 256, 256, device, dtype)(seed)
        with torch.no_grad():
            return ir, vis, encoders[0].encode(ir)[1], encoders[1].encode(vis)[1]

    def cached_step(network: torch.nn.Module, encoders: list = encoders) -> Callable:
        def step(ir, vis, ir_deep, vis_deep):
            fusion_optimizer.zero_grad(set_to_none=True)
            fusion_loss_terms(network, encoders[0], encoders[1], ir, vis, deep=(ir_deep, vis_deep))["loss"].backward()
            fusion_optimizer.step()
        return step

    shallow_flops = 2 * count_forward(meta_autoencoder, lambda: meta_autoencoder.shallow(crops)).total
    cases.append(Case(
        name="train stage 2 cached 256x256 b8", group="training", flops=shallow_flops + 3 * fusion_flops,
        min_bytes=3 * tensor_bytes(crops) + 2 * tensor_bytes(deep)
        + ADAM_PARAMETER_TRANSFERS * parameter_bytes(fusion, trainable_only=True),
        make_inputs=make_cached,
        providers=keep({"eager": cached_step(fusion),
                        **_fast_providers(lambda backend, layout: cached_step(
                            FastFusionNet(fusion, backend), [FastAutoEncoder(e, layout, backend) for e in encoders]),
                            on_gpu)}),
        quick=False, notes="--cache-features: the deep maps read, not computed; shallow maps, fusion forward, "
                           "backward, Adam"))
    return cases
