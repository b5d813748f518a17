"""``crossfuse_fast.metrics``: each metric against an independent computation (scikit-image,
scikit-learn, numpy/scipy written here) on generated images with known answers, and each
convention's difference pinned."""
import math

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import scipy.signal
import torch
from skimage.measure import shannon_entropy
from skimage.metrics import structural_similarity
from sklearn.metrics import mutual_info_score

from crossfuse_fast import metrics
from crossfuse_fast.metrics import CONVENTIONS, evaluate, metric_names
from crossfuse_fast.metrics.statistics import PSNR_TANG_OFFSET_DB
from crossfuse_fast.synthetic import synthetic_pair


@pytest.fixture(scope="module")
def images():
    """Two synthetic pairs (uint8 levels as float64, [2, 48, 64]) and a fused image made from them."""
    pairs = [synthetic_pair(48, 64, seed=seed) for seed in (3, 4)]
    ir = np.stack([p[0] for p in pairs]).astype(np.float64)
    vis = np.stack([p[1] for p in pairs]).astype(np.float64)
    fused = np.clip(np.rint(0.6 * np.maximum(ir, vis) + 0.4 * vis + np.random.default_rng(0).normal(0, 4, ir.shape)),
                    0, 255)
    return fused, ir, vis


def close(got, want, tolerance=1e-10):
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    assert np.allclose(got, want, rtol=tolerance, atol=tolerance), (got, want)


def test_entropy_sd_sf_ag_by_hand(images):
    fused, ir, vis = images
    close(metrics.en(fused, ir, vis), [shannon_entropy(f.astype(np.uint8), base=2) for f in fused])
    close(metrics.sd(fused, ir, vis), fused.std(axis=(1, 2)))
    rf = np.sqrt(np.mean(np.diff(fused, axis=1) ** 2, axis=(1, 2)))
    cf = np.sqrt(np.mean(np.diff(fused, axis=2) ** 2, axis=(1, 2)))
    close(metrics.sf(fused, ir, vis), np.sqrt(rf ** 2 + cf ** 2))
    s = [np.sqrt((gx ** 2 + gy ** 2) / 2) for gy, gx in (np.gradient(f) for f in fused)]
    close(metrics.ag(fused, ir, vis), [x.mean() for x in s])
    close(metrics.ag(fused, ir, vis, "tang"), [x.sum() / (47 * 63) for x in s])
    constant = np.full((1, 16, 16), 77.0)
    close(metrics.en(constant, constant, constant), [0.0])
    close(metrics.sf(constant, constant, constant), [0.0])


def test_li_sd_on_a_known_image():
    """``li`` SD is ``sqrt(sum((F/255 - mean)^2))``, not divided by N: 1 on this checkerboard,
    twice that on four copies of it; the standard SD is 127.5 on both."""
    board = np.array([[0.0, 255.0], [255.0, 0.0]])
    close(metrics.sd(board, board, board, "li"), [1.0])
    close(metrics.sd(np.tile(board, (2, 2)), np.tile(board, (2, 2)), np.tile(board, (2, 2)), "li"), [2.0])
    close(metrics.sd(board, board, board), [127.5])


def test_mutual_information_bits_nats_and_quirks(images):
    fused, ir, vis = images
    nats = [mutual_info_score(f.ravel(), a.ravel()) + mutual_info_score(f.ravel(), b.ravel())
            for f, a, b in zip(fused, ir, vis)]
    close(metrics.mi(fused, ir, vis, "cddfuse"), nats)
    close(metrics.mi(fused, ir, vis), np.array(nats) / math.log(2))
    # tang: Hab.m's uint8 + 1 saturates, merging levels 254 and 255 in the joint histogram only.
    assert fused.max() < 254 and ir.max() < 254 and vis.max() < 254
    close(metrics.mi(fused, ir, vis, "tang"), np.array(nats) / math.log(2))
    bright = np.minimum(fused + 60, 255)
    want = [(mutual_info_score(np.minimum(f, 254).ravel(), np.minimum(a, 254).ravel())
             + mutual_info_score(np.minimum(f, 254).ravel(), np.minimum(b, 254).ravel())) / math.log(2)
            + 2 * (shannon_entropy(f, base=2) - shannon_entropy(np.minimum(f, 254), base=2))
            + shannon_entropy(a, base=2) - shannon_entropy(np.minimum(a, 254), base=2)
            + shannon_entropy(b, base=2) - shannon_entropy(np.minimum(b, 254), base=2)
            for f, a, b in zip(bright, ir, vis)]
    close(metrics.mi(bright, ir, vis, "tang"), want)
    assert (bright == 255).any()
    assert not np.allclose(metrics.mi(bright, ir, vis, "tang"), metrics.mi(bright, ir, vis))
    # An image against itself: MI(F, F) = H(F), so twice the entropy.
    close(metrics.mi(fused, fused, fused), 2 * metrics.en(fused, ir, vis).numpy())
    # li: 2 EN(F) whatever the sources.
    noise = np.random.default_rng(1).integers(0, 256, fused.shape).astype(np.float64)
    close(metrics.mi(fused, noise, noise, "li"), 2 * metrics.en(fused, ir, vis).numpy())
    # vifb requantises each image by its own range: halving the sources' levels changes nothing there.
    close(metrics.mi(fused, ir / 2, vis / 2, "vifb"), metrics.mi(fused, ir, vis, "vifb").numpy())
    assert not np.allclose(metrics.mi(fused, ir / 2, vis / 2, "cddfuse"), metrics.mi(fused, ir, vis, "cddfuse"))


def test_correlations_and_psnr_by_hand(images):
    fused, ir, vis = images
    r = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
    close(metrics.cc(fused, ir, vis), [(r(a, f) + r(b, f)) / 2 for f, a, b in zip(fused, ir, vis)])
    close(metrics.scd(fused, ir, vis), [r(f - b, a) + r(f - a, b) for f, a, b in zip(fused, ir, vis)])
    # tang centres the visible image with the infrared mean; F - mean(F) sums to 0, so only rounding moves.
    close(metrics.cc(fused, ir, vis, "tang"), metrics.cc(fused, ir, vis).numpy(), 1e-12)
    mse = (((fused - ir) ** 2).mean(axis=(1, 2)) + ((fused - vis) ** 2).mean(axis=(1, 2))) / 2
    close(metrics.psnr(fused, ir, vis), 10 * np.log10(255 ** 2 / mse))
    close(metrics.psnr(fused, ir, vis, "tang"), 10 * np.log10(255 ** 2 / mse) + PSNR_TANG_OFFSET_DB)
    assert round(PSNR_TANG_OFFSET_DB, 2) == 48.13
    close(metrics.psnr(fused, ir, vis, "cddfuse"), 10 * np.log10(fused.max(axis=(1, 2)) ** 2 / mse))


def test_ssim_against_scikit_image(images):
    fused, ir, vis = images

    def skimage_pair(**kwargs):
        return np.array([structural_similarity(a, f, **kwargs) + structural_similarity(b, f, **kwargs)
                         for f, a, b in zip(fused, ir, vis)])
    standard = skimage_pair(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    close(metrics.ssim(fused, ir, vis), standard / 2, 1e-9)
    close(metrics.ssim(fused, ir, vis, "vifb"), standard, 1e-9)  # the pair sum
    # cddfuse: scikit-image 0.19's defaults on float arrays, data range 2 (not 255).
    cddfuse = metrics.ssim(fused, ir, vis, "cddfuse")
    close(cddfuse, skimage_pair(data_range=2.0), 1e-9)
    assert not np.allclose(cddfuse, skimage_pair(data_range=255.0))
    close(metrics.ssim(fused, fused, fused), [1.0, 1.0])


def test_matlab_ssim_is_replicate_padded_with_unit_constants(images):
    """``li`` and ``tang``: MATLAB ``ssim`` ('same', replicate padding, L = 1), on 0..1 and 0..255
    data; written here with scipy's Gaussian filter (MATLAB's 11 x 11 window is scipy's at
    truncate 10/3)."""
    fused, ir, vis = images

    def matlab_ssim(x, y):
        blur = lambda z: scipy.ndimage.gaussian_filter(z, 1.5, mode="nearest", truncate=5 / 1.5)  # noqa: E731
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        return (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()
    for convention, scale in (("li", 255.0), ("tang", 1.0)):
        want = [(matlab_ssim(a / scale, f / scale) + matlab_ssim(b / scale, f / scale)) / 2
                for f, a, b in zip(fused, ir, vis)]
        close(metrics.ssim(fused, ir, vis, convention), want, 1e-9)


def _qabf_numpy(f, a, b):
    """Qabf as METRICS defines it, with scipy's convolve2d."""
    def edges(x):
        sx = scipy.signal.convolve2d(x, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], mode="same")
        sy = scipy.signal.convolve2d(x, [[1, 2, 1], [0, 0, 0], [-1, -2, -1]], mode="same")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.hypot(sx, sy), np.where(sx == 0, np.pi / 2, np.arctan(sy / sx))

    def q(gx, ax, gf, af):
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.select([gx > gf, gx < gf], [gf / gx, gx / gf], gf)
        return 0.9994 / (1 + np.exp(-15 * (g - 0.5))) * 0.9879 / (1 + np.exp(-22 * (1 - np.abs(ax - af) / (np.pi / 2) - 0.8)))
    (ga, aa), (gb, ab), (gf, af) = edges(a), edges(b), edges(f)
    return (q(ga, aa, gf, af) * ga + q(gb, ab, gf, af) * gb).sum() / (ga + gb).sum()


def _nabf_numpy(f, a, b):
    """Nabf as METRICS defines it, with numpy's reflect padding."""
    def edges(x):
        padded = np.pad(x, 1, mode="reflect")
        gv = scipy.signal.correlate2d(padded, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]) / 8, mode="valid")
        gh = scipy.signal.correlate2d(padded, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]) / 8, mode="valid")
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.hypot(gv, gh), np.where((gv == 0) & (gh == 0), 0.0, np.arctan(gv / gh))
    (ga, aa), (gb, ab), (gf, af) = edges(a), edges(b), edges(f)

    def q(gx, ax):
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where((gx == 0) | (gf == 0), 0.0, np.minimum(gx, gf) / np.maximum(gx, gf))
        o = np.abs(np.abs(ax - af) - np.pi / 2) * 2 / np.pi
        return np.sqrt(0.9999 / (1 + np.exp(-19 * (g - 0.5))) * 0.9995 / (1 + np.exp(-22 * (o - 0.5))))
    wa, wb = np.where(ga >= 2, ga ** 1.5, 0.001), np.where(gb >= 2, gb ** 1.5, 0.001)
    na = (gf > ga) & (gf > gb)
    return (na * ((1 - q(ga, aa)) * wa + (1 - q(gb, ab)) * wb)).sum() / (wa + wb).sum()


def test_edge_metrics_by_hand(images):
    fused, ir, vis = images
    close(metrics.qabf(fused, ir, vis), [_qabf_numpy(f, a, b) for f, a, b in zip(fused, ir, vis)])
    close(metrics.nabf(fused, ir, vis), [_nabf_numpy(f, a, b) for f, a, b in zip(fused, ir, vis)])
    close(metrics.nabf(fused, ir, vis, "tang"), [_nabf_numpy(a, b, f) for f, a, b in zip(fused, ir, vis)])
    close(metrics.nabf(fused, ir, vis, "li"), [_nabf_numpy(f / 255, a / 255, b / 255) for f, a, b in zip(fused, ir, vis)])
    close(metrics.nabf(fused, fused, fused), [0.0, 0.0])  # nothing added where the fused image is a source


def _vifp_numpy(reference, distorted):
    """Multiscale VIFp as METRICS defines it, with scipy's convolve2d."""
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        y, x = np.mgrid[:n, :n] - (n - 1) / 2
        h = np.exp(-(x * x + y * y) / (2 * (n / 5) ** 2))
        h[h < np.finfo(float).eps * h.max()] = 0
        win = h / h.sum()
        filt = lambda z: scipy.signal.convolve2d(z, win, mode="valid")  # noqa: E731 (win is symmetric)
        if scale > 1:
            reference, distorted = filt(reference)[::2, ::2], filt(distorted)[::2, ::2]
        mr, md = filt(reference), filt(distorted)
        vr, vd = np.maximum(filt(reference ** 2) - mr ** 2, 0), np.maximum(filt(distorted ** 2) - md ** 2, 0)
        cov = filt(reference * distorted) - mr * md
        g = cov / (vr + 1e-10)
        sv = vd - g * cov
        g[vr < 1e-10], sv[vr < 1e-10], vr[vr < 1e-10] = 0, vd[vr < 1e-10], 0
        g[vd < 1e-10], sv[vd < 1e-10] = 0, 0
        sv[g < 0], g[g < 0] = vd[g < 0], 0
        sv[sv <= 1e-10] = 1e-10
        num += np.log10(1 + g * g * vr / (sv + 2)).sum()
        den += np.log10(1 + vr / 2).sum()
    return num / den


def test_vif_by_hand():
    ir, vis = (x.astype(np.float64) for x in synthetic_pair(72, 80, seed=5))
    fused = (ir + vis) / 2
    close(metrics.vif(fused, ir, vis), [_vifp_numpy(ir, fused) + _vifp_numpy(vis, fused)])
    close(metrics.vif(ir, ir, ir), [2.0])  # VIFp of an image against itself is 1


def test_li_vif_reproduces_sheikhs_vifvec():
    """``li``'s VIF, the pair mean of the wavelet-domain ``vifvec`` on 0..1 images, against
    LIVE's ``vifvec`` code (with matlabPyrTools, its MEX files built for Octave) under Octave 7.3,
    on the integer pattern at 128 x 144: the two sources' values were 0.27906367903398621 and
    0.28826862687640631, an image against itself 0.99999999999999334."""
    i, j = np.mgrid[:128, :144]
    ir = ((i * 7 + j * 13 + (i * j) % 17) % 256).astype(np.float64)
    vis = ((i * i + 3 * j + 40 * np.sin(i / 5.0).round()) % 251).astype(np.float64)
    fused = np.floor((ir + vis) / 2)
    close(metrics.vif(fused, ir, vis, "li"), [(0.27906367903398621 + 0.28826862687640631) / 2], 1e-12)
    close(metrics.vif(ir, ir, ir, "li"), [0.99999999999999334], 1e-12)
    with pytest.raises(ValueError, match="at least 72 x 72"):
        metrics.vif(fused[:64], ir[:64], vis[:64], "li")


def test_batches_devices_shapes_and_names(images):
    fused, ir, vis = images
    whole = evaluate(fused, ir, vis, metrics="EN,ssim,Nabf")
    assert list(whole) == ["EN", "SSIM", "Nabf"]
    single = evaluate(torch.from_numpy(fused[1])[None, None], ir[1], vis[1], metrics=["EN", "SSIM", "Nabf"])
    for name in whole:
        close(single[name], whole[name][1:])
    with pytest.raises(ValueError, match="unknown metric XYZ"):
        metric_names("EN,XYZ")
    with pytest.raises(ValueError, match="unknown convention 'matlab'"):
        metrics.en(fused, ir, vis, "matlab")
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.en(fused, ir[:, :10], vis)
    assert set(CONVENTIONS) == {"standard", "li", "tang", "cddfuse", "vifb"}


# Numbers produced by MMIF-CDDFuse's own utils/Evaluator.py (commit fd8da1f, run as it is with
# numpy 2, scipy 1.17, scikit-learn 1.9, scikit-image 0.26 given data_range=2, its 0.19 default)
# on the integer pattern below, in float64. The code itself is not part of this project.
CDDFUSE_EVALUATOR = {
    "EN": 7.669795308064941, "SD": 51.52654397177957, "SF": 63.60227432281766, "AG": 21.450982087570583,
    "MI": 4.930682088498028, "SCD": 1.418877580324148, "CC": 0.7046990906859754, "PSNR": 13.621729451144525,
    "VIF": 0.21472908159432894, "Qabf": 0.309134977285741, "SSIM": 1.1869635718275475,
}


# Numbers produced by Linfeng-Tang/Evaluation-for-Image-Fusion's own MATLAB files (commit 0e87153,
# Evaluation/*.m called as analysis_Reference calls them) under GNU Octave 7.3 with its image
# package, on the same integer pattern. The code itself is not part of this project.
TANG_EVALUATION = {
    "EN": 7.6697953080649413, "MI": 7.1134705972760024, "PSNR": 61.959349726588002, "SF": 63.602274322817649,
    "SD": 51.526543971779574, "VIF": 0.21472908159432824, "AG": 22.098396033875531, "CC": 0.70469909068597547,
    "SCD": 1.4188775803241487, "Qabf": 0.30913497728574107, "Nabf": 0.082217099007770952,
}


def _pattern():
    i, j = np.mgrid[:64, :72]
    ir = ((i * 7 + j * 13 + (i * j) % 17) % 256).astype(np.float64)
    vis = ((i * i + 3 * j + 40 * np.sin(i / 5.0).round()) % 251).astype(np.float64)
    return np.floor((ir + vis) / 2), ir, vis


@pytest.mark.parametrize("convention,want", [("cddfuse", CDDFUSE_EVALUATOR), ("tang", TANG_EVALUATION)])
def test_conventions_reproduce_their_codebases(convention, want):
    got = evaluate(*_pattern(), convention, list(want))
    for name, value in want.items():
        close(got[name], [value], 1e-11)


def test_viff_reproduces_hans_code():
    """VIFF against ``VIFF_Public(ir, vis, fused)`` of Han et al. (the authors' MATLAB file, as
    published) under Octave 7.3, on the integer pattern; an image against itself gives 1 (its
    distortion variance is floored at 1e-10, so not exactly)."""
    close(metrics.viff(*_pattern()), [0.27904575432377277], 1e-12)
    _, ir, _ = _pattern()
    close(metrics.viff(ir, ir, ir), [0.99999999999973932], 1e-12)


def test_fmi_reproduces_haghighats_code():
    """FMI on raw pixels against ``analysis_fmi(a, b, f, 'none')`` of Evaluation-for-Image-Fusion
    (0e87153) under Octave 7.3, on the integer pattern with a window where all three images are
    one constant and a block where the visible image equals the fused one (the code's special
    cases); FMI on the DCT is FMI on scipy's orthonormal DCT-II of each image."""
    fused, ir, vis = _pattern()
    ir[:8, :8], fused[:8, :8] = 100, 100
    vis[19:30, 19:30] = fused[19:30, 19:30]
    close(metrics.fmi_pixel(fused, ir, vis), [0.47869061251166878], 1e-12)
    transformed = [scipy.fft.dctn(x, norm="ortho") for x in (fused, ir, vis)]
    close(metrics.fmi_dct(fused, ir, vis), metrics.fmi_pixel(*transformed).numpy(), 1e-12)
    close(metrics.fmi_pixel(ir, ir, ir), [1.0])
    for convention in ("li", "tang"):
        with pytest.raises(NotImplementedError, match="edge maps"):
            metrics.fmi_pixel(fused, ir, vis, convention)


def test_fmi_wavelet_is_fmi_on_the_reranged_dmey_mosaic():
    """FMI on wavelets is FMI_pixel on ``rerange([cA cH; cV cD])`` of PyWavelets' one-level
    ``dmey`` transform with symmetric extension (numpy here); ``li`` and ``tang`` use MATLAB's
    other ``dmey`` filter and are refused."""
    import pywt

    fused, ir, vis = _pattern()

    def mosaic(x):
        a, (h, v, d) = pywt.dwt2(x, "dmey", mode="symmetric")
        m = np.block([[a, h], [v, d]])
        return (m - m.min()) / (m.max() - m.min())
    assert mosaic(ir).shape == (2 * 62, 2 * 66)  # floor((n + 61) / 2) per side
    close(metrics.fmi_wavelet(fused, ir, vis), metrics.fmi_pixel(*(mosaic(x) for x in (fused, ir, vis))).numpy(),
          1e-12)
    close(metrics.fmi_wavelet(ir, ir, ir), [1.0])
    for convention in ("li", "tang"):
        with pytest.raises(NotImplementedError, match="102-tap dmey"):
            metrics.fmi_wavelet(fused, ir, vis, convention)


def test_the_optional_libraries_are_named_when_missing(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in ("pywt", "pyrtools")
                        else find_spec(name, *args))
    fused, ir, vis = _pattern()
    with pytest.raises(NotImplementedError, match="pip install PyWavelets"):
        metrics.fmi_wavelet(fused, ir, vis)
    with pytest.raises(NotImplementedError, match="pip install pyrtools"):
        metrics.vif(fused, ir, vis, "li")
