"""Fusion quality metrics with named conventions (docs/metrics.md).

Every metric is ``metric(fused, ir, vis, convention="standard") -> Tensor [B]`` (float64), on
images ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` (tensors, on any device, or numpy arrays)
of grey levels on 0..255. ``convention`` reproduces a codebase papers use: ``standard`` (the
definitions of docs/metrics.md), ``li``, ``tang``, ``cddfuse``, ``vifb``; a metric a codebase
does not compute uses the standard definition.

    >>> from crossfuse_fast.metrics import evaluate
    >>> scores = evaluate(fused, ir, vis, convention="tang")   # {"EN": tensor([...]), ...}
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

from torch import Tensor

from ._images import CONVENTIONS
from .fmi import fmi_dct, fmi_pixel, fmi_wavelet
from .gradient import nabf, qabf
from .information import mi
from .statistics import ag, cc, en, psnr, scd, sd, sf
from .structural import ms_ssim, ssim
from .vif import vif, viff

METRICS: dict[str, Callable[..., Tensor]] = {
    "EN": en, "SD": sd, "SF": sf, "AG": ag, "MI": mi, "SCD": scd, "CC": cc, "PSNR": psnr,
    "SSIM": ssim, "MS-SSIM": ms_ssim, "VIF": vif, "VIFF": viff, "Qabf": qabf, "Nabf": nabf, "FMI_pixel": fmi_pixel,
    "FMI_dct": fmi_dct, "FMI_wavelet": fmi_wavelet,
}
"""Every metric by the name papers use."""

HIGHER_IS_BETTER = {name: name != "Nabf" for name in METRICS}
NOT_IMPLEMENTED = {("li", "FMI_pixel"), ("tang", "FMI_pixel"), ("li", "FMI_wavelet"), ("tang", "FMI_wavelet")} | (
    {("li", "VIF")} if importlib.util.find_spec("pyrtools") is None else set()) | (
    {(convention, "FMI_wavelet") for convention in CONVENTIONS} if importlib.util.find_spec("pywt") is None else set())
"""``(convention, metric)`` pairs not implemented (their calls raise ``NotImplementedError``); ``li``'s
VIF where ``pyrtools`` is not installed, FMI_wavelet where PyWavelets is not
(``pip install crossfuse-fast[metrics]``)."""


def available(convention: str) -> list[str]:
    """The metrics that ``convention`` computes here, in :data:`METRICS` order."""
    return [name for name in METRICS if (convention, name) not in NOT_IMPLEMENTED]


def metric_names(text: str | Sequence[str] | None) -> list[str]:
    """Names from ``"EN,SD"`` (or a list; ``None``: all), matched without regard to case;
    ``ValueError`` naming an unknown one."""
    if text is None:
        return list(METRICS)
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    by_lower = {name.lower(): name for name in METRICS}
    unknown = [name for name in names if name.lower() not in by_lower]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or '(none given)'}; use some of {', '.join(METRICS)}")
    return [by_lower[name.lower()] for name in names]


def evaluate(fused, ir, vis, convention: str = "standard", metrics: str | Sequence[str] | None = None
             ) -> dict[str, Tensor]:
    """``{name: metric(fused, ir, vis, convention)}`` for ``metrics`` (default: all)."""
    return {name: METRICS[name](fused, ir, vis, convention) for name in metric_names(metrics)}


__all__ = ["CONVENTIONS", "HIGHER_IS_BETTER", "METRICS", "NOT_IMPLEMENTED", "ag", "available", "cc", "en", "evaluate",
           "fmi_dct", "fmi_pixel", "fmi_wavelet", "metric_names", "mi", "ms_ssim", "nabf", "psnr", "qabf", "scd", "sd",
           "sf", "ssim", "vif", "viff"]
