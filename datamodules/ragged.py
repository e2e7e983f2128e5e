"""Many integer sequences in two flat arrays (CSR layout): what a million users' histories cost
as one array and offsets instead of a million Python objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, SupportsIndex, overload

import numpy as np


class Ragged(Sequence[np.ndarray]):
    """Sequence ``i`` is ``values[offsets[i]:offsets[i + 1]]``, handed out as a view.

    It behaves like the list of arrays it replaces (len, indexing, iteration), and its
    whole-collection operations are vectorised.
    """

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size == 0 or offsets[0] != 0 or offsets[-1] != len(values) or (np.diff(offsets) < 0).any():
            raise ValueError(f"Ragged: offsets must rise from 0 to len(values)={len(values)}")
        self.values = np.asarray(values)
        self.offsets = offsets

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray], dtype: np.dtype | type = np.int64) -> Ragged:
        """One Ragged from a list of arrays (copies them once)."""
        if isinstance(arrays, Ragged):
            return arrays
        lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        values = np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if len(arrays) else np.zeros(0, dtype=dtype)
        return cls(values, np.concatenate(([0], np.cumsum(lengths))))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: SupportsIndex) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> NoReturn: ...

    def __getitem__(self, i: SupportsIndex | slice) -> np.ndarray:
        if isinstance(i, slice):
            raise TypeError("Ragged: index with an integer, or use take() for many rows")
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"Ragged index {i} out of range for {n} sequences")
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_of_values(self) -> np.ndarray:
        """The sequence each value belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.lengths())

    def append_each(self, tail: np.ndarray) -> Ragged:
        """A new Ragged with ``tail[i]`` appended to sequence ``i``."""
        tail = np.asarray(tail)
        if len(tail) != len(self):
            raise ValueError(f"Ragged.append_each: {len(tail)} values for {len(self)} sequences")
        values = np.insert(self.values, self.offsets[1:], tail.astype(self.values.dtype, copy=False))
        return Ragged(values, self.offsets + np.arange(len(self.offsets), dtype=np.int64))

    def keep_values(self, keep: np.ndarray) -> Ragged:
        """A new Ragged without the values where the boolean ``keep`` (one per value) is False."""
        kept_per_row = np.bincount(self.row_of_values()[keep], minlength=len(self))
        return Ragged(self.values[keep], np.concatenate(([0], np.cumsum(kept_per_row))))

    def take(self, rows: np.ndarray) -> Ragged:
        """A new Ragged of the sequences ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths()[rows]
        new_offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        # index of every value taken: its row's old start plus its place in the row
        within = np.arange(new_offsets[-1], dtype=np.int64) - np.repeat(new_offsets[:-1], lengths)
        return Ragged(self.values[np.repeat(self.offsets[rows], lengths) + within], new_offsets)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building a million acyclic objects (per-item lists and
    strings) otherwise triggers full collections over every live object, which makes the
    loading grow faster than the number of items."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
