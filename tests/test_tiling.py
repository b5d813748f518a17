"""``crossfuse_fast.tiling``: the network on overlapping tiles gives the untiled result (exactly up
to float64 rounding), each halo is as wide as it must be, and ``fuse(tile=...)`` uses it."""
import copy

import pytest
import torch

from crossfuse_fast import fuse, tiling
from crossfuse_fast.fast import FastCrossFuse
from crossfuse_fast.tiling import check_tile, fuse_in_tiles, needs_tiles

# (height, width, tile): odd sizes, sizes not a multiple of 8 (the decoder's size adjust), tiles
# smaller than a window of the cross encoder and than the encoder's halo, one tile of 8 pixels.
CASES = [(45, 301, 40), (33, 17, 8), (70, 90, 24)]


def _pair(height: int, width: int, batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(batch, 1, height, width, generator=generator, dtype=torch.float64) * 255
                 for _ in range(2))


@pytest.fixture(scope="module")
def exact(model):
    return copy.deepcopy(model).double()


@pytest.mark.parametrize("network_kind", ["reference", "fast"])
@pytest.mark.parametrize("height,width,tile", CASES)
def test_tiles_give_the_untiled_result_in_float64(exact, network_kind, height, width, tile):
    network = exact if network_kind == "reference" else FastCrossFuse(exact, "torch")
    ir, vis = _pair(height, width)
    with torch.no_grad():
        whole, tiled = network(ir, vis), fuse_in_tiles(network, ir, vis, tile)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max().item() < 1e-9


@pytest.mark.parametrize("constant,narrower", [("ENCODER_HALO", 24), ("UPSAMPLE_REACH", 1), ("SHALLOW_HALO", 0)])
def test_each_halo_is_needed(exact, monkeypatch, constant, narrower):
    """One step narrower and tiles no longer agree: the halos are not wider than the proof needs
    to be tested."""
    ir, vis = _pair(70, 90, batch=1)
    monkeypatch.setattr(tiling, constant, narrower)
    with torch.no_grad():
        difference = (fuse_in_tiles(exact, ir, vis, 24) - exact(ir, vis)).abs().max().item()
    assert difference > 1e-6


def test_fuse_runs_large_images_in_tiles(model, monkeypatch):
    """``fuse`` tiles an image with a side over ``tile`` and not others; float32 tiles agree with
    the untiled call to rounding (docs/tiling.md#exactness)."""
    calls = []
    original = tiling.fuse_in_tiles
    monkeypatch.setattr(tiling, "fuse_in_tiles",
                        lambda *args, **options: calls.append(args[-1]) or original(*args, **options))
    ir, vis = (x.float() for x in _pair(40, 56, batch=1, seed=1))
    whole = fuse(ir, vis, model=model, backend="reference", tile=None)
    assert calls == []
    assert torch.equal(fuse(ir, vis, model=model, backend="reference", tile=56), whole)
    assert calls == []
    tiled = fuse(ir, vis, model=model, backend="reference", tile=16)
    assert calls == [16]
    assert (tiled - whole).abs().max().item() < 1e-2


@pytest.mark.parametrize("tile", [0, 4, 12, -8, 8.0, True, "16"])
def test_bad_tiles_are_refused(tile):
    with pytest.raises(ValueError, match="tile must be a multiple of 8"):
        check_tile(tile)


def test_needs_tiles():
    assert needs_tiles(1025, 10, 1024) and not needs_tiles(1024, 1024, 1024)
    assert not needs_tiles(10_000, 10_000, None)
