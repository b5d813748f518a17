"""Reading and writing checkpoints: the authors' ``.model`` files and our own.

Everything is read with ``torch.load(weights_only=True)`` or safetensors, so a checkpoint can
carry tensors only, never code. A file that is not what the caller expects gets a
:class:`CheckpointError` naming the file and what was expected. Writing never replaces an
existing file unless asked, and goes through a temporary file so a crash leaves no half file.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .files import write_atomically

SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or holds something other than expected."""


def _describe(keys: list[str]) -> str:
    """A short guess at what a state dict with these keys is, for error messages."""
    if any(key.startswith("cross_atten_block.") for key in keys):
        return "it looks like a CrossFuse fusion network checkpoint"
    if any(key.startswith("fea_encoder1.") for key in keys):
        return "it looks like a CrossFuse autoencoder checkpoint"
    if any(key.startswith(("ir_autoencoder.", "vis_autoencoder.")) for key in keys):
        return "it looks like a crossfuse-fast CrossFuse bundle (load it with CrossFuse.load)"
    return f"its first keys are {keys[:3]}"


def read_tensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` mapping stored in ``path`` (torch.save or safetensors file).

    ``what`` names the expected content in errors ("an infrared autoencoder checkpoint").
    """
    path = Path(path)
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
        raise CheckpointError(f"{path}: {kind} (expected {what})")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's concern
            warnings.simplefilter("ignore")
            if path.suffix == SAFETENSORS_SUFFIX:
                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged pickle can fail with almost any exception type
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if "weights only load failed" in str(error).lower():  # torch's advice to unpickle anyway is not ours
            detail = "it holds Python objects other than tensors, which are never unpickled here"
        else:
            detail = f"not a PyTorch state dict or safetensors file ({type(error).__name__}: {first_line})"
        raise CheckpointError(f"{path}: not a readable checkpoint (expected {what}): {detail}") from error
    if not isinstance(state, Mapping) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors "
                              f"(expected {what})")
    return dict(state)


def check_state_dict(state: Mapping[str, torch.Tensor], module: nn.Module, path: str | os.PathLike,
                     what: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly ``module``'s keys and shapes."""
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} expected keys are missing (e.g. {missing[0]!r})")
        if unexpected:
            details.append(f"{len(unexpected)} keys are unexpected (e.g. {unexpected[0]!r})")
        raise CheckpointError(f"{path}: not {what}: {'; '.join(details)}; {_describe(list(state))}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{path}: not {what}: {key!r} has shape {tuple(state[key].shape)}, "
                                  f"expected {tuple(tensor.shape)}")
        if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
            raise CheckpointError(f"{path}: {key!r} holds NaN or infinite values; a model with them fuses nothing "
                                  f"(expected {what})")


def load_into(module: nn.Module, path: str | os.PathLike, what: str) -> nn.Module:
    """Load the state dict in ``path`` into ``module`` with ``strict=True`` after checking it."""
    state = read_tensors(path, what)
    check_state_dict(state, module, path, what)
    module.load_state_dict(state, strict=True)
    return module


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, overwrite: bool = False,
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``{name: tensor}``: safetensors for a ``.safetensors`` path, else ``torch.save``.

    The ``torch.save`` form is the released checkpoints' own (a plain state dict), so a
    stage-1 or stage-2 result saved as ``.model`` loads wherever the authors' files do.
    """
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    if Path(path).suffix == SAFETENSORS_SUFFIX:
        def write(target: str) -> None:
            save_file(tensors, target, metadata=dict(metadata or {}))
    else:
        def write(target: str) -> None:
            torch.save(tensors, target)
    return write_atomically(path, write, overwrite=overwrite)
