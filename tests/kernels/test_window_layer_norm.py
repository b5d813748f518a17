"""``kernels.window_layer_norm`` and ``kernels.windows``: the cross encoder's first and last
LayerNorm, reading and writing windowed feature maps by address."""
import pytest
import torch
from utils import DEVICE, TOLERANCE, relative_error

from crossfuse_fast import kernels
from crossfuse_fast.kernels.windows import WindowGrid, map_to_tokens, tokens_to_map
from crossfuse_fast.reference.functional import from_windows, patchify, to_windows, unpatchify


@pytest.mark.parametrize("height,width", [(32, 32), (40, 70), (5, 70), (1, 1), (64, 33)])
def test_window_twins_are_the_reference_windows_and_patches(height, width):
    """``map_to_tokens`` / ``tokens_to_map`` are the pad, windows and patches of
    docs/model.md#windows-and-tokens (the kernels' addressing is checked against them below),
    including pads longer than the map."""
    x = torch.randn(2, 3, height, width)
    tokens = map_to_tokens(x, (32, 32))
    assert torch.equal(tokens, patchify(to_windows(x)))
    assert tokens.shape == WindowGrid.of(x.shape, (32, 32)).token_shape
    assert torch.equal(tokens_to_map(tokens, height, width, (32, 32)),
                       from_windows(unpatchify(tokens, 32, 32), 2, height, width))


# (map shape, window): exact windows, a crop, pads longer than the side (repeated mirroring),
# one-pixel sides, a non-square window.
MAP_CASES = [((1, 4, 6, 4), (6, 4)), ((2, 3, 5, 7), (4, 4)), ((1, 2, 3, 2), (8, 2)), ((1, 2, 1, 3), (2, 4))]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,window", MAP_CASES, ids=lambda c: "x".join(map(str, c)))
def test_layer_norms_at_the_map_ends(poisoned_allocations, shape, window, channels_last):
    """The encoder's first LayerNorm (reading windows of patches by address) and last (adding the
    other module's output and writing the map by address): outputs and every gradient against fp64
    twins. Poisoned buffers catch a missed pixel; the padded windows must crop and fold back."""
    torch.manual_seed(sum(shape) + sum(window))
    height, width = shape[-2:]
    features = shape[1] * 4
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=DEVICE).to(memory_format=memory_format).requires_grad_()
    token_shape = WindowGrid.of(shape, window).token_shape
    residual, plus = (torch.randn(token_shape, device=DEVICE, requires_grad=True) for _ in range(2))
    weight, bias = (torch.randn(features, device=DEVICE, requires_grad=True) for _ in range(2))
    inputs = (x, residual, plus, weight, bias)
    doubled = [t.detach().double().requires_grad_() for t in inputs]

    def first_and_last(layer_norm_from_map, add_layer_norm_to_map, x, residual, plus, weight, bias):
        normed, tokens = layer_norm_from_map(x, weight, bias, 1e-6, window)
        out = add_layer_norm_to_map(normed, residual, plus, weight, bias, 1e-6, height, width, window)
        return normed, tokens, out

    got = first_and_last(kernels.layer_norm_from_map, kernels.add_layer_norm_to_map, *inputs)
    want = first_and_last(kernels.layer_norm_from_map_torch, kernels.add_layer_norm_to_map_torch, *doubled)
    with torch.no_grad():
        direct = first_and_last(kernels.layer_norm_from_map, kernels.add_layer_norm_to_map, *inputs)
    for name, g, w, d in zip(("normed", "tokens", "map"), got, want, direct):
        assert g.shape == w.shape, name
        assert torch.equal(d, g), name
        assert relative_error(g, w) < TOLERANCE[torch.float32], name
    upstream = [torch.randn(w.shape, device=DEVICE) for w in want]
    have = torch.autograd.grad(sum((g * u).sum() for g, u in zip(got, upstream)), inputs)
    expected = torch.autograd.grad(sum((w * u.double()).sum() for w, u in zip(want, upstream)), doubled)
    for name, h, w in zip(("x", "residual", "plus", "weight", "bias"), have, expected):
        assert relative_error(h, w) < 5 * TOLERANCE[torch.float32], name


def test_map_ops_name_mismatched_operands():
    """The kernels index every operand by the same offsets, so a short one must be refused, not read past."""
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.layer_norm_from_map(torch.randn(1, 2, 4, 4, device=DEVICE), ones[:6], ones[:6], 1e-6, (4, 4))
    tokens = torch.randn(1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="plus must have the shape of x"):
        kernels.add_layer_norm_to_map(tokens, tokens, tokens[:, :2], ones, ones, 1e-6, 4, 4, (4, 4))


def test_map_ops_name_a_bad_geometry():
    weight = torch.ones(8)
    with pytest.raises(ValueError, match="multiples of 2"):
        kernels.layer_norm_from_map(torch.randn(1, 2, 4, 4), weight, weight, 1e-6, (3, 4))
    with pytest.raises(ValueError, match="feature map"):
        kernels.layer_norm_from_map(torch.randn(2, 4, 4), weight, weight, 1e-6, (4, 4))
    tokens = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="do not cut a 8 x 4 map"):
        kernels.add_layer_norm_to_map(tokens, tokens, tokens, weight, weight, 1e-6, 8, 4, (4, 4))


def test_opcheck():
    torch.manual_seed(11)
    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    tokens = [torch.randn(2, 4, 16, device=DEVICE, requires_grad=True) for _ in range(3)]  # a 7 x 3 map's
    cases = [
        (torch.ops.crossfuse.layer_norm_from_map, (torch.randn(1, 4, 5, 3, device=DEVICE, requires_grad=True),
                                                   weight, weight.detach().clone().requires_grad_(), 1e-6, 4, 4)),
        (torch.ops.crossfuse.add_layer_norm_to_map, (*tokens, weight, weight.detach().clone().requires_grad_(),
                                                     1e-6, 7, 3, 4, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
