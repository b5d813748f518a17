"""Whether tensors changed since last seen, without reading their values (which on a GPU waits for
the queued work): what the derived-weight cache, the 16-bit copies and the CUDA graphs key on."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def versions(tensors: Iterable[Tensor | None]) -> tuple | None:
    """Per tensor ``(identity, storage address, version counter)`` (``None`` for a ``None``): equal
    again only if no tensor was replaced, moved or written in place. ``None`` when a tensor was
    made under ``torch.inference_mode``, which keeps no version counter: then nothing can tell."""
    state = []
    for t in tensors:
        if t is not None and t.is_inference():
            return None
        state.append(None if t is None else (id(t), t.data_ptr(), t._version))
    return tuple(state)
