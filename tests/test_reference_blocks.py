"""Each reference block against an independent formulation written here."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossfuse_fast.losses import msssim
from crossfuse_fast.reference import FusionNet, attention_ref
from crossfuse_fast.reference.functional import (from_windows, match_size, patchify, reflect_pad_extended,
                                                  to_windows, unpatchify)
from crossfuse_fast.reference.transformer import CrossModule, SelfBlock


@pytest.mark.parametrize("tokens", [1, 17, 256])
def test_reversed_attention_is_sdpa_on_negated_queries(tokens):
    torch.manual_seed(tokens)
    q, k, v = torch.randn(3, 2, 3, tokens, 32, dtype=torch.float64).unbind(0)
    expected = F.scaled_dot_product_attention(-q, k, v)
    torch.testing.assert_close(attention_ref(q, k, v, reverse=True), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention_ref(q, k, v, reverse=False), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-12, atol=1e-12)


def test_reversed_attention_favours_least_correlated_key():
    q = torch.tensor([[[[1.0, 0.0]]]]) * 10
    k = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert attention_ref(q, k, v, reverse=True)[0, 0, 0, 1] > 0.99


def mha_from(attn, q_weight, q_bias, kv_weights, kv_biases) -> torch.nn.MultiheadAttention:
    mha = torch.nn.MultiheadAttention(512, 16, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([q_weight, *kv_weights]))
        mha.in_proj_bias.copy_(torch.cat([q_bias, *kv_biases]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    return mha


def test_self_block_against_multihead_attention():
    torch.manual_seed(0)
    block = SelfBlock().double()
    x = torch.randn(2, 50, 512, dtype=torch.float64)
    w, b = block.attn.qkv.weight, block.attn.qkv.bias
    mha = mha_from(block.attn, w[:512], b[:512], (w[512:1024], w[1024:]), (b[512:1024], b[1024:]))
    n1 = F.layer_norm(x, (512,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    y = x + mha(n1, n1, n1, need_weights=False)[0]
    n2 = F.layer_norm(y, (512,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    y = y + F.linear(F.gelu(F.linear(n2, block.mlp.fc1.weight, block.mlp.fc1.bias)),
                     block.mlp.fc2.weight, block.mlp.fc2.bias)
    torch.testing.assert_close(block(x), y, rtol=1e-10, atol=1e-10)


def test_cross_module_against_multihead_attention_with_negated_queries():
    torch.manual_seed(1)
    module = CrossModule().double()
    block = module.blocks[0]
    xa, xb = torch.randn(2, 3, 40, 512, dtype=torch.float64).unbind(0)
    attn = block.attn
    # Negating the query projection turns MHA's softmax(q k^T) into softmax(-(q k^T)).
    mha = mha_from(attn, -attn.q_linear.weight, -attn.q_linear.bias,
                   (attn.k_linear.weight, attn.v_linear.weight), (attn.k_linear.bias, attn.v_linear.bias))

    def ln(t, norm):
        return F.layer_norm(t, (512,), norm.weight, norm.bias, eps=1e-6)

    y = xb + mha(ln(xa, block.norm1), ln(xb, block.norm1), ln(xb, block.norm1), need_weights=False)[0]
    y = y + block.mlp.fc2(F.gelu(block.mlp.fc1(ln(y, block.norm2))))
    torch.testing.assert_close(module(xa, xb), ln(y, module.norm), rtol=1e-10, atol=1e-10)


def test_box_filters_are_the_channel_sum_algebra():
    torch.manual_seed(2)
    weights = FusionNet().decoder_fusion.weight
    for conv, channels in ((weights.conv_de, 128), (weights.conv_sh, 32)):
        x = torch.rand(2, channels, 9, 13, dtype=torch.float64)
        # Every weight is the same value (1/9 as stored), so the conv is that value times the
        # zero-padded 3 x 3 box sum of the channel sum, identical for every output channel.
        weight = conv.weight.flatten()[0].double()
        box_sum = F.avg_pool2d(x.sum(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=True) * 9
        torch.testing.assert_close(conv.double()(x), (weight * box_sum).expand(-1, channels, -1, -1),
                                   rtol=1e-12, atol=1e-12)


def test_patch_token_order():
    x = torch.randn(2, 5, 32, 32)
    tokens = patchify(x)
    assert tokens.shape == (2, 256, 20)
    for i, j, c, dy, dx in [(0, 0, 0, 0, 0), (3, 7, 4, 1, 0), (15, 15, 2, 1, 1), (9, 2, 1, 0, 1)]:
        assert tokens[1, i * 16 + j, c * 4 + dy * 2 + dx] == x[1, c, 2 * i + dy, 2 * j + dx]
    assert torch.equal(unpatchify(tokens, 32, 32), x)


def test_windows_row_major_and_round_trip():
    x = torch.randn(2, 3, 37, 51)
    windows = to_windows(x)
    assert windows.shape == (2 * 2 * 2, 3, 32, 32)
    padded = F.pad(x, (0, 13, 0, 27), mode="reflect")
    assert torch.equal(windows[5], padded[1, :, 0:32, 32:64])
    assert torch.equal(windows[2], padded[0, :, 32:64, 0:32])
    assert torch.equal(from_windows(windows, 2, 37, 51), x)


def test_rectangular_windows_row_major_and_round_trip():
    """``(wh, ww)`` windows (the fast encoder's own windows need not be square)."""
    x = torch.randn(2, 3, 9, 10)
    windows = to_windows(x, (4, 6))
    assert windows.shape == (2 * 3 * 2, 3, 4, 6)
    padded = F.pad(x, (0, 2, 0, 3), mode="reflect")
    assert torch.equal(windows[3], padded[0, :, 4:8, 6:12])
    assert torch.equal(windows[6 + 4], padded[1, :, 8:12, 0:6])
    assert torch.equal(from_windows(windows, 2, 9, 10), x)
    assert torch.equal(to_windows(x, (32, 32)), to_windows(x))


def test_extended_reflection_equals_reflection_where_that_exists_and_mirrors_beyond():
    x = torch.randn(1, 2, 20, 9)
    torch.testing.assert_close(reflect_pad_extended(x, 3, 8, 0, 19), F.pad(x, (3, 8, 0, 19), mode="reflect"),
                               rtol=0, atol=0)
    row = torch.arange(4.0).reshape(1, 1, 1, 4)
    # Mirroring 0 1 2 3 with period 6: 0 1 2 3 2 1 0 1 2 3 2 1 0 1
    assert reflect_pad_extended(row, 0, 10, 0, 0).flatten().tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]
    single = torch.full((1, 1, 1, 1), 7.0)
    assert torch.equal(reflect_pad_extended(single, 1, 31, 2, 0), torch.full((1, 1, 3, 33), 7.0))


def test_size_adjust_splits_the_difference():
    x = torch.arange(8.0 * 8).reshape(1, 1, 8, 8)
    y = match_size(x, 11, 13)
    assert y.shape == (1, 1, 11, 13)
    torch.testing.assert_close(y, F.pad(x, (2, 3, 1, 2), mode="reflect"), rtol=0, atol=0)


def _gaussian(size: int) -> np.ndarray:
    g = np.array([math.exp(-((i - size // 2) ** 2) / (2 * 1.5 ** 2)) for i in range(size)])
    return g / g.sum()


def _ssim_by_hand(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Loops over every valid window position of single-channel images ``a`` and ``b``."""
    height, width = a.shape
    size = min(11, height, width)
    window = np.outer(_gaussian(size), _gaussian(size))
    max_value = 255.0 if a.max() > 128 else 1.0
    min_value = -1.0 if a.min() < -0.5 else 0.0
    c1, c2 = (0.01 * (max_value - min_value)) ** 2, (0.03 * (max_value - min_value)) ** 2
    sims, contrasts = [], []
    for y in range(height - size + 1):
        for x in range(width - size + 1):
            pa, pb = a[y:y + size, x:x + size], b[y:y + size, x:x + size]
            mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
            var_a = (window * pa * pa).sum() - mu_a ** 2
            var_b = (window * pb * pb).sum() - mu_b ** 2
            cov = (window * pa * pb).sum() - mu_a * mu_b
            contrast = (2 * cov + c2) / (var_a + var_b + c2)
            contrasts.append(contrast)
            sims.append((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1) * contrast)
    return float(np.mean(sims)), float(np.mean(contrasts))


@pytest.mark.parametrize("scale", [255.0, 1.0])
def test_msssim_variant_by_hand(scale):
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (16, 16)) * scale
    b = np.clip(a + rng.normal(0, 0.2, a.shape) * scale, 0, scale)
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    sims, contrasts = [], []
    pa, pb = a, b
    for level in range(5):
        if level:
            pa = pa.reshape(pa.shape[0] // 2, 2, pa.shape[1] // 2, 2).mean(axis=(1, 3))
            pb = pb.reshape(pb.shape[0] // 2, 2, pb.shape[1] // 2, 2).mean(axis=(1, 3))
        sim, contrast = _ssim_by_hand(pa, pb)
        sims.append((sim + 1) / 2)
        contrasts.append((contrast + 1) / 2)
    expected = np.prod([contrasts[i] ** weights[i] * sims[4] ** weights[4] for i in range(4)])
    got = msssim(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], normalize=True)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert 0 < expected < 1
