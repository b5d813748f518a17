"""State dicts against the released checkpoints' keys, and loading/saving checkpoints."""
import copy
import pickle

import pytest
import torch

from conftest import DATA
from crossfuse_fast import CheckpointError, CrossFuse, fuse
from crossfuse_fast.checkpoints import save_tensors
from crossfuse_fast.reference import AutoEncoder, FusionNet


def released_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    """``{"autoencoder": {key: shape}, "fusion": {key: shape}}`` from the copied TSV."""
    files: dict[str, dict[str, tuple[int, ...]]] = {"autoencoder": {}, "fusion": {}}
    for line in (DATA / "checkpoint_keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        file, key, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        files["autoencoder" if file.startswith("autoencoder") else "fusion"][key] = dims
    return files


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_autoencoder_state_dict_matches_released_checkpoint():
    expected = released_keys()["autoencoder"]
    assert len(expected) == 26
    assert shapes(AutoEncoder()) == expected


def test_fusion_state_dict_matches_released_checkpoint():
    expected = released_keys()["fusion"]
    assert len(expected) == 134
    assert shapes(FusionNet()) == expected


def test_fixed_filters_are_initialised_as_released():
    net = FusionNet()
    assert torch.all(net.decoder_fusion.weight.conv_de.weight == 1 / 9)
    assert torch.all(net.decoder_fusion.weight.conv_sh.weight == 1 / 9)
    assert not net.decoder_fusion.weight.conv_de.weight.requires_grad
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
    assert torch.equal(net.conv_gra.weight, laplacian.expand(32, 32, 3, 3))
    assert net.conv_gra.weight.requires_grad


@pytest.fixture
def original_files(tmp_path, model):
    """The three parts saved the way the authors released them: torch.save of a state dict."""
    paths = {}
    for part in ("ir_autoencoder", "vis_autoencoder", "fusion"):
        paths[part] = tmp_path / f"{part}.model"
        torch.save(getattr(model, part).state_dict(), paths[part])
    return paths


def reproduces(loaded: CrossFuse, model: CrossFuse, height: int, width: int) -> None:
    """Every tensor of ``loaded`` equals ``model``'s bit for bit, and so does what they compute: in
    float64, since in fp32 two instances can differ by far more than rounding (README, Numerics:
    where the deep activities cancel, the weights amplify differences MKL makes by the memory
    alignment of its operands; one CI run saw 8e-4 grey levels)."""
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    generator = torch.Generator().manual_seed(height * width)
    ir, vis = torch.rand(2, 1, 1, height, width, generator=generator, dtype=torch.float64).mul(255).unbind(0)
    want = fuse(ir, vis, model=copy.deepcopy(model).double())
    assert (fuse(ir, vis, model=loaded.double()) - want).abs().max().item() < 1e-9


def test_from_original_loads_strict_and_reproduces(original_files, model):
    loaded = CrossFuse.from_original(**original_files)
    assert not loaded.training
    reproduces(loaded, model, 40, 48)


def test_saved_and_reloaded_bundle_is_bit_identical(tmp_path, model, monkeypatch):
    path = model.save(tmp_path / "bundle.safetensors")
    reproduces(CrossFuse.load(path), model, 72, 88)
    loads = []
    load = CrossFuse.load
    monkeypatch.setattr(CrossFuse, "load", classmethod(lambda cls, p: loads.append(load(p)) or loads[-1]))
    ir, vis = torch.rand(2, 1, 1, 24, 32).mul(255).unbind(0)
    assert fuse(ir, vis, model=str(path)).shape == ir.shape
    assert len(loads) == 1  # fuse loads a path as the bundle
    reproduces(loads[0], model, 24, 32)


def test_save_refuses_to_overwrite(tmp_path, model):
    path = tmp_path / "bundle.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="bundle.safetensors"):
        model.save(path)
    assert path.read_bytes() == b"precious"
    model.save(path, overwrite=True)
    assert CrossFuse.load(path) is not None


def test_fusion_file_given_as_autoencoder(original_files):
    files = dict(original_files, ir_autoencoder=original_files["fusion"])
    with pytest.raises(CheckpointError, match=r"fusion\.model: not an infrared autoencoder checkpoint.*"
                                              r"fusion network checkpoint"):
        CrossFuse.from_original(**files)


def test_autoencoder_file_given_as_fusion(original_files):
    files = dict(original_files, fusion=original_files["vis_autoencoder"])
    with pytest.raises(CheckpointError, match=r"vis_autoencoder\.model: not a fusion network checkpoint"):
        CrossFuse.from_original(**files)


def test_truncated_file(original_files):
    path = original_files["fusion"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"fusion\.model: not a readable checkpoint \(expected a fusion"):
        CrossFuse.from_original(**original_files)


def test_not_a_checkpoint(original_files):
    original_files["vis_autoencoder"].write_text("these are not the weights you are looking for\n")
    with pytest.raises(CheckpointError, match=r"vis_autoencoder\.model: not a readable checkpoint.*not a PyTorch "
                                              r"state dict or safetensors file") as caught:
        CrossFuse.from_original(**original_files)
    assert "weights_only" not in str(caught.value)


class Payload:
    """Stands for arbitrary pickled code, which weights_only loading must refuse."""


def test_pickled_objects_are_refused(original_files):
    with open(original_files["fusion"], "wb") as handle:
        pickle.dump({"weights": Payload()}, handle, protocol=2)
    with pytest.raises(CheckpointError, match=r"fusion\.model: not a readable checkpoint.*holds Python objects "
                                              r"other than tensors, which are never unpickled here") as caught:
        CrossFuse.from_original(**original_files)
    assert "weights_only" not in str(caught.value) and "Re-running" not in str(caught.value)


def test_missing_file(original_files, tmp_path):
    files = dict(original_files, fusion=tmp_path / "nowhere.model")
    with pytest.raises(CheckpointError, match=r"nowhere\.model: no such file \(expected a fusion"):
        CrossFuse.from_original(**files)


def test_wrong_shape_is_named(original_files, tmp_path):
    state = torch.load(original_files["ir_autoencoder"], weights_only=True)
    state["fea_encoder1.conv1.conv2d.0.weight"] = torch.zeros(16, 1, 3, 3)
    save_tensors(state, original_files["ir_autoencoder"], overwrite=True)
    with pytest.raises(CheckpointError, match=r"'fea_encoder1\.conv1\.conv2d\.0\.weight' has shape \(16, 1, 3, 3\)"):
        CrossFuse.from_original(**original_files)


def test_bundle_given_where_original_expected(tmp_path, original_files, model):
    bundle = model.save(tmp_path / "bundle.safetensors")
    with pytest.raises(CheckpointError, match="CrossFuse bundle"):
        CrossFuse.from_original(**dict(original_files, fusion=bundle))


def test_non_finite_weights_are_refused_at_load(tmp_path, original_files):
    """A NaN weight would fuse every image to black: refused, with the tensor named."""
    model = CrossFuse()
    with torch.no_grad():
        model.fusion.decoder_fusion.conv1.conv2d[0].weight[0, 0, 0, 0] = float("nan")
    bundle = model.save(tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match=r"'fusion.decoder_fusion.conv1.conv2d.0.weight' holds NaN or infinite"):
        CrossFuse.load(bundle)
    state = torch.load(original_files["ir_autoencoder"], weights_only=True)
    state["fea_encoder1.conv1.conv2d.0.bias"][0] = float("inf")
    torch.save(state, original_files["ir_autoencoder"])
    with pytest.raises(CheckpointError, match=r"'fea_encoder1.conv1.conv2d.0.bias' holds NaN or infinite"):
        CrossFuse.from_original(**original_files)
