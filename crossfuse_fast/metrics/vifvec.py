"""The wavelet-domain VIF of Sheikh and Bovik (``vifvec``, IEEE TIP 15(2), 2006), which Hui Li's
MATLAB code reports as "VIF" (the ``li`` convention).

The images are decomposed by the steerable pyramid of 4 levels with the fifth-order (6-band)
filters and reflected edges; the two bands at 0 and 90 degrees of each level (8 subbands) are
modelled as Gaussian scale mixtures of 3 x 3 vectors. For a subband of the reference ``y`` and of
the distorted image ``yn``, at every third position (correlations with a ``2^l + 1`` box window,
``l`` 1 at the coarsest level to 4 at the finest, reflected edges): the gain
``g = cov / var_y`` and the error variance ``vv = (var_yn - g cov) / window`` with the usual
clamps (tolerance 1e-15); the reference's 9 x 9 covariance ``C_U`` over all overlapping 3 x 3
blocks and its eigenvalues ``lambda``; per non-overlapping block ``s = x^T C_U^-1 x / 9``;
positions closer to the border than ``ceil(window / 2 / 3)`` are left out; then
``VIF = sum log2(1 + g^2 s lambda / (vv + 0.4)) / sum log2(1 + s lambda / 0.4)`` over subbands,
positions and eigenvalues. The pyramid and the strided correlations are ``pyrtools``'s (the
Python port of the matlabPyrTools that the original code calls, the same C code), in numpy, one
image at a time (docs/metrics.md#libraries).
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 3
NOISE_VARIANCE = 0.4
TOLERANCE = 1e-15
LEVELS = 4
BANDS = (0, 3)
"""The orientations used at each level: 0 and 90 degrees (the original's subbands 4, 7, ..., 25)."""


def _pyramid_bands(image: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(window level l, band)`` of the 8 subbands, coarsest level first (the original's order)."""
    import pyrtools

    coefficients = pyrtools.pyramids.SteerablePyramidSpace(image, height=LEVELS, order=5,
                                                           edge_type="reflect1").pyr_coeffs
    return [(LEVELS - level, coefficients[(level, band)]) for level in reversed(range(LEVELS))
            for band in reversed(BANDS)]


def _cropped(band: np.ndarray) -> np.ndarray:
    height, width = (side // BLOCK * BLOCK for side in band.shape)
    return band[:height, :width]


def _channel(reference: np.ndarray, distorted: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """The distortion channel's gain and error variance at every third position (``vifsub_est_m``)."""
    from pyrtools.pyramids.c.wrapper import corrDn

    size = 2 ** level + 1
    window = np.ones((size, size))
    count = window.sum()
    y, yn = _cropped(reference), _cropped(distorted)
    half = BLOCK // 2
    stop = (y.shape[0] - math.ceil(BLOCK / 2) + 1, y.shape[1] - math.ceil(BLOCK / 2) + 1)

    def correlate(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return corrDn(x, weights, "reflect1", step=(BLOCK, BLOCK), start=(half, half), stop=stop)

    mean_x, mean_y = correlate(y, window / count), correlate(yn, window / count)
    cov = correlate(y * yn, window) - count * mean_x * mean_y
    var_x = np.maximum(correlate(y * y, window) - count * mean_x ** 2, 0)
    var_y = np.maximum(correlate(yn * yn, window) - count * mean_y ** 2, 0)
    g = cov / (var_x + TOLERANCE)
    vv = (var_y - g * cov) / count
    flat = var_x < TOLERANCE
    g[flat], vv[flat], var_x[flat] = 0, var_y[flat], 0
    flat = var_y < TOLERANCE
    g[flat], vv[flat] = 0, 0
    negative = g < 0
    vv[negative], g[negative] = var_y[negative], 0
    vv[vv <= TOLERANCE] = TOLERANCE
    return g, vv


def _reference_field(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The GSM multiplier field ``s`` and the eigenvalues of ``C_U`` (``refparams_vecgsm``)."""
    y = _cropped(reference)
    rows, columns = y.shape
    # Block element order as in the original: column offset j outer, row offset k inner.
    offsets = [(k, j) for j in range(BLOCK) for k in range(BLOCK)]
    overlapping = np.stack([y[k:rows - (BLOCK - 1 - k), j:columns - (BLOCK - 1 - j)].reshape(-1, order="F")
                            for k, j in offsets])
    centred = overlapping - overlapping.mean(axis=1, keepdims=True)
    covariance = centred @ centred.T / overlapping.shape[1]
    blocks = np.stack([y[k::BLOCK, j::BLOCK].reshape(-1, order="F") for k, j in offsets])
    s = (np.linalg.inv(covariance) @ blocks * blocks).sum(axis=0) / BLOCK ** 2
    return s.reshape(rows // BLOCK, columns // BLOCK, order="F"), np.linalg.eigvalsh(covariance)


def vifvec(reference: np.ndarray, distorted: np.ndarray) -> float:
    """The wavelet-domain VIF of ``distorted`` against ``reference`` (``[H, W]`` float arrays, on
    the scale the caller chooses: ``li`` passes 0..1); both sides at least 72 pixels (4 levels)."""
    if min(reference.shape) < 72:
        raise ValueError("the wavelet-domain VIF needs images of at least 72 x 72 (its four pyramid levels)")
    num = den = 0.0
    for (level, band), (_, distorted_band) in zip(_pyramid_bands(reference), _pyramid_bands(distorted)):
        g, vv = _channel(band, distorted_band, level)
        s, eigenvalues = _reference_field(band)
        border = math.ceil((2 ** level) / 2 / BLOCK)
        inner = (slice(border, -border or None),) * 2
        g, vv, s = g[inner], vv[inner], s[inner]
        for eigenvalue in eigenvalues:
            num += np.log2(1 + g * g * s * eigenvalue / (vv + NOISE_VARIANCE)).sum()
            den += np.log2(1 + s * eigenvalue / NOISE_VARIANCE).sum()
    return float(num / den)
