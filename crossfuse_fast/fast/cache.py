"""Values derived from weights, made again only when a weight they come from changes."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor

from ..tensor_versions import versions

T = TypeVar("T")


class Derived(Generic[T]):
    """``compute()``, computed again only when one of ``sources()`` changes: another tensor, new
    storage (``Module.to``) or a write into it (its version counter).

    So that calls need not read the weights they depend on, which on a GPU waits for the queued
    work. Inference tensors (made under ``torch.inference_mode``) keep no version counter, so
    with one among the sources the value is computed on every call. Under ``torch.compile`` the
    computation is traced instead (the compiled graph derives the values from the weights it is
    given, so a changed weight shows there too); a value that reads the weights' data into Python
    (``traceable=False``) is the one last derived outside, fixed in the compiled graph.
    """

    def __init__(self, sources: Callable[[], tuple[Tensor | None, ...]], compute: Callable[[], T], *,
                 traceable: bool = True):
        self.sources = sources
        self.compute = compute
        self.traceable = traceable
        self._state: tuple | None = None
        self._value: T | None = None

    def get(self) -> T:
        if torch.compiler.is_compiling():
            if self.traceable:
                # Traced into the compiled graph, which reads the weights as its inputs on every call.
                return self.compute()
            if self._state is None:
                raise RuntimeError("a value read from the weights' data must be derived once before compiling")
            return self._value
        state = versions(self.sources())
        if state is None:
            return self.compute()
        if state != self._state:
            self._value, self._state = self.compute(), state
        return self._value
