"""Values derived from weights, made again only when a weight they come from changes."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


class Derived(Generic[T]):
    """``compute()``, computed again only when one of ``sources()`` changes: another tensor, new
    storage (``Module.to``) or a write into it (its version counter).

    So that calls need not read the weights they depend on, which on a GPU waits for the queued
    work. Inference tensors (made under ``torch.inference_mode``) keep no version counter, so
    with one among the sources the value is computed on every call.
    """

    def __init__(self, sources: Callable[[], tuple[Tensor | None, ...]], compute: Callable[[], T]):
        self.sources = sources
        self.compute = compute
        self._state: tuple | None = None
        self._value: T | None = None

    def get(self) -> T:
        sources = self.sources()
        if any(t is not None and t.is_inference() for t in sources):
            return self.compute()
        state = tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in sources)
        if state != self._state:
            self._value, self._state = self.compute(), state
        return self._value
