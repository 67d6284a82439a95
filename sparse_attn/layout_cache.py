"""`LayoutCache`: the one bounded, thread-safe cache of built layouts (patterns and modules both use it),
and `build_for_every_mode`, the rule every cache of tensors in the package follows."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def build_for_every_mode(build):
    """``build()`` outside inference mode, so that what a cache keeps is made of normal tensors.

    A tensor made under `torch.inference_mode()` can never be saved for backward: a layout cached by an
    evaluation call would break every later training call with the same shapes. Normal tensors serve both
    (inference-mode code reads them freely)."""
    with torch.inference_mode(False):
        return build()


class LayoutCache:
    """The `size` most recently used entries, built on demand; safe to use from several threads."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, build):
        """The entry for `key`, built with ``build()`` on a miss (outside the lock: builds may be slow)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = build_for_every_mode(build)
        with self._lock:
            # Another thread may have built it meanwhile: keep the first, so every caller sees one object.
            value = self._entries.setdefault(key, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    # Copies and pickles (deepcopy of a model holding a module) get a fresh lock; a lock cannot be copied.
    def __getstate__(self) -> dict:
        with self._lock:
            return {"size": self.size, "_entries": OrderedDict(self._entries)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __iter__(self):
        """The keys, least recently used first (a snapshot)."""
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
