"""``fuse()``: the drop-in call that fuses infrared/visible pairs, from tensors or images."""
from __future__ import annotations

import copy
import functools
import itertools
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from . import tiling
from .backends import DEFAULT_BACKEND, NO_TRITON_NOTICE, fast_crossfuse, resolve_backend
from .cuda_graphs import graphed
from .model import CrossFuse
from .precision import (CONDITIONING_LIMIT, DEFAULT_PRECISION, SIXTEEN_BITS, SixteenBitFallback, check_precision,
                        model_in, tf32_allowed)

UINT16_SCALINGS = ("minmax", "full")
DEFAULT_UINT16_SCALING = "minmax"
MIN_SIDE = 8
"""Smallest image side: three 2 x 2 poolings must leave at least one deep pixel."""
INPUT_SLACK = 1.0
"""How far outside 0..255 a tensor input may reach (resampling overshoots) before it is refused."""


RELEASED = "released"
"""``fuse(model=...)``'s name for the authors' released weights (:meth:`CrossFuse.pretrained`)."""


def fuse(ir, vis, *, model: CrossFuse | str | os.PathLike = RELEASED, backend: str = DEFAULT_BACKEND,
         uint16_scaling: str = DEFAULT_UINT16_SCALING, tile: int | None = tiling.DEFAULT_TILE,
         precision: str = DEFAULT_PRECISION):
    """Fuse infrared and visible images with CrossFuse.

    Torch tensors ``[B, 1, H, W]``, float on 0..255, give the fused ``[B, 1, H, W]`` float on
    0..255, unrounded, on the input's device. Any batch size and any ``H, W >= 8`` work; on a
    CPU the images of a batch run one at a time (faster there), on a GPU all at once.

    An image with a side longer than ``tile`` pixels (default 1024; a multiple of 8, or ``None``
    for never) runs in overlapping tiles (:func:`crossfuse_fast.tiling.fuse_in_tiles`), so memory
    stays near that of one ``tile x tile`` image whatever the size: the same result up to
    rounding (equal to 1e-9 in float64; docs/tiling.md).

    Numpy images give a numpy image, ``uint8``, rounded to nearest:

    - ``ir``: ``uint8`` or ``uint16``, ``[H, W]`` or ``[H, W, 1]``; a 3-channel BGR array
      (some datasets store infrared that way) is converted to grey with OpenCV first.
    - ``vis``: ``uint8`` or ``uint16``, ``[H, W]``, ``[H, W, 1]`` or 3-channel BGR (as
      ``cv2.imread`` gives it). A colour image gives a colour result: the network fuses the
      luminance (OpenCV's BGR -> YCrCb) and the visible chroma is kept (docs/model.md#colour-and-input).
    - ``uint16`` data is mapped to 0..255 by ``uint16_scaling``: ``"minmax"`` (default)
      stretches each image's own range linearly, as thermal cameras' raw counts rarely fill
      16 bits; ``"full"`` divides by 257 (65535 -> 255).

    Two lists of numpy images of one size (video frames, say) give a list of fused images, run
    as one batch, each as it would be alone.

    ``backend="auto"`` (default) runs the fast path where Triton is installed and the reference
    model elsewhere (with a ``RuntimeWarning`` saying so); ``"fast"`` asks for the fast path
    (:class:`crossfuse_fast.fast.FastCrossFuse`, docs/fast-path.md), the same result up to float
    rounding (docs/model.md#numerics-of-the-deep-weighting), and raises ``ValueError`` where
    Triton is missing; ``"reference"`` runs the reference model. The fast network is made once
    per model and reused by later calls (what it derives from the weights is derived again when
    one changes; a replaced module makes a new network).

    ``model`` is ``"released"`` (default: the authors' weights, fetched and verified on first use
    by :meth:`CrossFuse.pretrained`, then kept for later calls; they run on the input tensors'
    device, the CPU for numpy images), a :class:`CrossFuse` (run on its own device), or the path
    of a bundle written by ``CrossFuse.save`` or of a folder holding the three released files. It
    runs with eval semantics (BatchNorm on its running statistics) and is never changed: a model
    in training mode keeps its mode and statistics (:func:`eval_view`). Mismatched sizes, wrong
    dtypes or shapes, NaN or infinite values, tensors beyond 0..255 (by more than one level) and
    images under 8 x 8 raise ``ValueError`` naming the problem.

    On a GPU the fast network is replayed from a CUDA graph for a shape it has fused before
    (:mod:`crossfuse_fast.cuda_graphs`: folders of one size, video frames), never on a CPU.

    ``precision`` (:mod:`crossfuse_fast.precision`): ``"fp32"`` (default), ``"tf32"`` (TF32 products
    on a GPU; fp32 on a CPU), ``"bf16"`` or ``"fp16"`` (the fast path on 16-bit weights and maps with
    fp32 accumulation, the decoder's weighting and the final stretch in fp32; a float32 result
    whose error against fp32 the README gives; an image whose deep weighting is too ill-conditioned
    for 16 bits is fused again in fp32, with a
    :class:`~crossfuse_fast.precision.SixteenBitFallback` warning naming it;
    ``backend="reference"`` stays fp32 and refuses them).
    """
    check_precision(precision)
    resolved = resolve_backend(backend)
    if backend == "auto" and resolved == "reference":
        warnings.warn(NO_TRITON_NOTICE, RuntimeWarning, stacklevel=2)
    backend = resolved
    tiling.check_tile(tile)
    if uint16_scaling not in UINT16_SCALINGS:
        raise ValueError(f"unknown uint16_scaling {uint16_scaling!r}; use one of {', '.join(UINT16_SCALINGS)}")
    if isinstance(model, str) and model == RELEASED:
        device = ir.device if isinstance(ir, torch.Tensor) else torch.device("cpu")
        model = released_model(device)
    elif isinstance(model, (str, os.PathLike)):
        model = CrossFuse.from_dir(model)
    if not isinstance(model, CrossFuse):
        raise ValueError("model must be 'released', a CrossFuse, or the path of a saved one or of the released "
                         f"weights' folder, not {type(model).__name__}")
    if backend == "reference" and precision in SIXTEEN_BITS:
        raise ValueError(f"precision {precision!r} runs on the fast path; the reference model is the fp32 oracle "
                         "(backend 'fast' or 'auto' for 16 bits)")
    if isinstance(ir, torch.Tensor) and isinstance(vis, torch.Tensor):
        return _fuse_tensors(ir, vis, model, backend, tile, precision)
    if isinstance(ir, np.ndarray) and isinstance(vis, np.ndarray):
        return _fuse_images([ir], [vis], model, uint16_scaling, backend, tile, precision)[0]
    if isinstance(ir, (list, tuple)) and isinstance(vis, (list, tuple)):
        if len(ir) != len(vis) or not ir:
            raise ValueError(f"ir and vis must be lists of as many images, at least one, got {len(ir)} and {len(vis)}")
        if not all(isinstance(x, np.ndarray) for x in (*ir, *vis)):
            raise ValueError("lists of images must hold numpy arrays")
        return _fuse_images(list(ir), list(vis), model, uint16_scaling, backend, tile, precision)
    raise ValueError("ir and vis must both be torch tensors, both numpy arrays or both lists of numpy arrays, "
                     f"not {type(ir).__name__} and {type(vis).__name__}")


def released_model(device: torch.device | str = "cpu") -> CrossFuse:
    """The released weights on ``device``, loaded once per cache folder and device and kept."""
    from .weights import default_weights_dir
    return _released_model(str(default_weights_dir().resolve()), str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _released_model(weights_dir: str, device: str) -> CrossFuse:
    return CrossFuse.pretrained(Path(weights_dir)).to(device)


def _check_tensor(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"{name} must be a [B, 1, H, W] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor on 0..255, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if min(x.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"{name} is {x.shape[-2]} x {x.shape[-1]}; images must be at least "
                         f"{MIN_SIDE} x {MIN_SIDE}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = x.min().item(), x.max().item()
    if low < -INPUT_SLACK or high > 255.0 + INPUT_SLACK:
        raise ValueError(f"{name} has values from {low:.4g} to {high:.4g}; fuse takes images on 0..255")


def _fuse_tensors(ir: torch.Tensor, vis: torch.Tensor, model: CrossFuse, backend: str, tile: int | None,
                  precision: str = DEFAULT_PRECISION) -> torch.Tensor:
    _check_tensor("ir", ir)
    _check_tensor("vis", vis)
    if ir.shape != vis.shape:
        raise ValueError(f"ir and vis differ in shape: {tuple(ir.shape)} and {tuple(vis.shape)}")
    device = ir.device
    sixteen_bits = precision in SIXTEEN_BITS
    with torch.no_grad():  # not inference mode: the 16-bit copy keeps version counters for its cache
        full_precision = eval_view(model)
        model = model_in(full_precision, precision)
    parameter = next(model.parameters())
    with torch.inference_mode(), tf32_allowed(precision):
        network = fast_crossfuse(model) if backend == "fast" else model
        # 16 bits: each image's deep weighting conditioning comes with it (crossfuse_fast.precision).
        method = "forward_with_conditioning" if sixteen_bits else "forward"
        # On a GPU a shape seen before replays a CUDA graph of the fast network (crossfuse_fast.cuda_graphs).
        run = (graphed(network, method) if backend == "fast" and parameter.device.type == "cuda"
               else getattr(network, method))
        images = ir.to(parameter), vis.to(parameter)
        # A CPU runs the full-resolution convolutions of a batch slower than its images one
        # by one (bench/RESULTS.md, "fuse ... b8").
        chunk = 1 if parameter.device.type == "cpu" else ir.shape[0]
        in_tiles = tiling.needs_tiles(*ir.shape[-2:], tile)
        parts = [tiling.fuse_in_tiles(network, *(x[start:start + chunk] for x in images), tile,
                                      with_conditioning=sixteen_bits)
                 if in_tiles else run(*(x[start:start + chunk] for x in images))
                 for start in range(0, ir.shape[0], chunk)]
    if not sixteen_bits:
        return torch.cat(parts).to(device)
    fused = torch.cat([part[0] for part in parts]).to(torch.float32, copy=True)
    conditioning = torch.cat([part[1] for part in parts]).tolist()
    redo = [index for index, value in enumerate(conditioning) if value > CONDITIONING_LIMIT]
    if redo:
        fused[redo] = _fuse_tensors(ir[redo], vis[redo], full_precision, backend, tile).to(fused)
        values = [conditioning[index] for index in redo]
        warnings.warn(SixteenBitFallback(
            f"{len(redo)} of {ir.shape[0]} images fused in fp32 instead of {precision}: their deep weighting is too "
            f"ill-conditioned for 16 bits (conditioning up to {max(values):.3g}, limit {CONDITIONING_LIMIT:g}; "
            "README, Precision)", redo, values), stacklevel=3)
    return fused.to(device)


def eval_view(model: CrossFuse) -> CrossFuse:
    """``model`` where every module is in eval mode; else a copy of its modules in eval mode that
    shares its parameters and buffers, so that the model's own mode and BatchNorm statistics are
    never touched (threads may share a model in training mode)."""
    if not any(module.training for module in model.modules()):
        return model
    shared = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared).eval()


def _check_image(name: str, image: np.ndarray, colour_ok: bool) -> None:
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{name} must be a uint8 or uint16 image, got dtype {image.dtype} "
                         "(pass float data as torch tensors on 0..255)")
    channels_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in ((1, 3) if colour_ok else (1,)))
    if not channels_ok:
        raise ValueError(f"{name} must be [H, W], [H, W, 1] or [H, W, 3] (BGR), got shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"{name} is {image.shape[0]} x {image.shape[1]}; images must be at least "
                         f"{MIN_SIDE} x {MIN_SIDE}")


def _to_unit_float(image: np.ndarray, uint16_scaling: str) -> np.ndarray:
    """uint8/uint16 -> float32 on 0..1 (uint16 by ``uint16_scaling``)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if uint16_scaling == "full":
        return image.astype(np.float32) / 65535.0
    low, high = float(image.min()), float(image.max())
    return (image.astype(np.float32) - low) / max(high - low, 1.0)


def luminance_pair(ir: np.ndarray, vis: np.ndarray,
                   uint16_scaling: str = DEFAULT_UINT16_SCALING) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A pair of images as :func:`fuse` takes them, checked, as float32 grey on 0..255 ``(ir, vis
    luma)``, and the visible YCrCb on 0..1 when the visible image is in colour (else ``None``);
    ``ValueError`` names what is wrong. :func:`to_image` turns the fused luma back into an image."""
    _check_image("ir", ir, colour_ok=True)
    _check_image("vis", vis, colour_ok=True)
    if ir.shape[:2] != vis.shape[:2]:
        raise ValueError(f"ir and vis differ in size: {ir.shape[0]} x {ir.shape[1]} and "
                         f"{vis.shape[0]} x {vis.shape[1]}")
    ir_unit = _to_unit_float(ir, uint16_scaling)
    if ir_unit.ndim == 3 and ir_unit.shape[2] == 3:
        ir_unit = cv2.cvtColor(ir_unit, cv2.COLOR_BGR2GRAY)
    vis_unit = _to_unit_float(vis, uint16_scaling)
    ycrcb = None
    if vis_unit.ndim == 3 and vis_unit.shape[2] == 3:
        # Float input to OpenCV is taken as 0..1, with chroma centred on 0.5.
        ycrcb = cv2.cvtColor(vis_unit, cv2.COLOR_BGR2YCrCb)
        vis_luma = ycrcb[..., 0]
    else:
        vis_luma = vis_unit.reshape(vis_unit.shape[:2])
    return ir_unit.reshape(ir_unit.shape[:2]) * 255.0, vis_luma * 255.0, ycrcb


def _fuse_images(irs: list[np.ndarray], viss: list[np.ndarray], model: CrossFuse, uint16_scaling: str,
                 backend: str, tile: int | None, precision: str = DEFAULT_PRECISION) -> list[np.ndarray]:
    pairs = [luminance_pair(ir, vis, uint16_scaling) for ir, vis in zip(irs, viss)]
    sizes = {pair[0].shape for pair in pairs}
    if len(sizes) > 1:
        raise ValueError(f"the images of one call must share a size, got {' and '.join(f'{h} x {w}' for h, w in sorted(sizes))}")
    ir_tensor = torch.from_numpy(np.stack([pair[0] for pair in pairs]))[:, None]
    vis_tensor = torch.from_numpy(np.stack([pair[1] for pair in pairs]))[:, None]
    fused_batch = _fuse_tensors(ir_tensor, vis_tensor, model, backend, tile, precision)[:, 0].cpu().numpy()
    return [to_image(fused, ycrcb) for fused, (_, _, ycrcb) in zip(fused_batch, pairs)]


def to_image(fused: np.ndarray, ycrcb: np.ndarray | None) -> np.ndarray:
    """The fused luma ``[H, W]`` on 0..255 as a uint8 image, rounded to nearest: grey, or in colour
    with the visible image's chroma when :func:`luminance_pair` gave its ``ycrcb`` (changed here)."""
    if ycrcb is not None:
        ycrcb[..., 0] = fused / 255.0
        fused = cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2BGR) * 255.0
    return np.clip(np.rint(fused), 0, 255).astype(np.uint8)
