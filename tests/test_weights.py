"""``crossfuse_fast.weights``: the released weights fetched, verified by their git blob ids and
cached, against a local HTTP server serving generated checkpoints (no network needed)."""
import io
from pathlib import Path

import pytest
import torch
from conftest import Server, blob_id

from crossfuse_fast import CheckpointError, CrossFuse
from crossfuse_fast import weights as weights_module
from crossfuse_fast.reference import AutoEncoder, FusionNet
from crossfuse_fast.weights import ReleasedFile, WeightsError, git_blob_id, released_files


@pytest.fixture
def served():
    """Two small files and the manifest that names them."""
    payloads = {"models/a/first.model": b"first checkpoint" * 1000, "models/b/second.model": b"second" * 777}
    manifest = [ReleasedFile(part, path, blob_id(payloads[path]))
                for part, path in (("ir_autoencoder", "models/a/first.model"), ("fusion", "models/b/second.model"))]
    server = Server(payloads)
    yield server, manifest
    server.close()


def test_git_blob_id_is_gits(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git hash-object
    assert git_blob_id(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_fetched_verified_and_then_served_from_the_cache(served, tmp_path):
    server, manifest = served
    paths = released_files(tmp_path, files=manifest, base_url=server.url, progress=False)
    assert {part: path.name for part, path in paths.items()} == {"ir_autoencoder": "first.model",
                                                                  "fusion": "second.model"}
    assert all(git_blob_id(paths[f.part]) == f.blob for f in manifest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.model", "second.model"]  # no temporary left
    asked = len(server.requests)
    assert released_files(tmp_path, files=manifest, base_url=server.url, progress=False) == paths
    assert len(server.requests) == asked == 2  # the second call asked nothing


@pytest.mark.parametrize("fault", ["truncated", "wrong file", "no server"])
def test_a_failed_download_names_what_to_do_and_leaves_nothing(served, tmp_path, fault):
    server, manifest = served
    if fault == "truncated":
        server.truncate = True
    elif fault == "wrong file":
        server.files["models/b/second.model"] = b"something else"
    else:
        server.close()
    with pytest.raises(WeightsError) as caught:
        released_files(tmp_path, files=manifest, base_url=server.url, progress=False)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message and "by hand" in message
    assert all(server.url + f.path in message for f in manifest)
    if fault == "wrong file":
        assert "not the released second.model" in message
    assert not (tmp_path / "second.model").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "first.model"] == []


def test_a_wrong_file_in_the_cache_is_reported_and_fetched_again(served, tmp_path):
    server, manifest = served
    (tmp_path / "first.model").write_bytes(b"damaged")
    lines = []
    paths = released_files(tmp_path, files=manifest, base_url=server.url, progress=False, log=lines.append)
    assert len(lines) == 1 and "first.model: not the released file" in lines[0] and "fetching it again" in lines[0]
    assert git_blob_id(paths["ir_autoencoder"]) == manifest[0].blob


def _state_bytes(module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def released_like():
    """Generated checkpoints in the released layout and a manifest naming them."""
    torch.manual_seed(0)
    payloads = {f.path: _state_bytes(module) for f, module in
                zip(weights_module.RELEASED, (AutoEncoder(), AutoEncoder(), FusionNet()))}
    return payloads, [ReleasedFile(f.part, f.path, blob_id(payloads[f.path])) for f in weights_module.RELEASED]


def test_pretrained_loads_what_it_fetched(released_like, tmp_path, monkeypatch):
    payloads, manifest = released_like
    server = Server(payloads)
    try:
        monkeypatch.setattr(weights_module, "RELEASED", tuple(manifest))
        monkeypatch.setenv("CROSSFUSE_WEIGHTS_URL", server.url)
        monkeypatch.setenv("CROSSFUSE_WEIGHTS_DIR", str(tmp_path / "cache"))
        model = CrossFuse.pretrained(progress=False)
        assert not model.training
        expected = torch.load(io.BytesIO(payloads[manifest[2].path]), weights_only=True)
        assert all(torch.equal(model.fusion.state_dict()[key], value) for key, value in expected.items())
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(f.name for f in manifest)
        from_dir = CrossFuse.from_dir(tmp_path / "cache")
        assert all(torch.equal(a, b) for a, b in zip(from_dir.state_dict().values(), model.state_dict().values()))
    finally:
        server.close()


def test_from_dir_names_the_missing_file_and_takes_a_bundle(tmp_path):
    with pytest.raises(CheckpointError, match="auto_encoder_epoch_4_ir.model: missing; the folder must hold the "
                                              "released ir autoencoder"):
        CrossFuse.from_dir(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder or bundle"):
        CrossFuse.from_dir(tmp_path / "nowhere")
    bundle = CrossFuse().save(tmp_path / "model.safetensors")
    assert isinstance(CrossFuse.from_dir(bundle), CrossFuse)
    assert Path(bundle).exists()
