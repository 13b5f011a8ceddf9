"""Frozen-prefix outputs shared by the trials of one machine.

The output of a frozen prefix on a dataset split depends only on the prefix's weights and the
split's images. Trials that reuse the same donor on the same data (most of a study: the best donor
of a signature changes rarely) would compute the same tensor again; the first one stores it here
and the others read it. Files are `.npy` (read with allow_pickle=False), named by a hash of the
frozen weights, the split's images and labels, the layer count and the dtype, written atomically
(a reader never sees half a file) and bounded in total size (least recently used removed first).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

FEATURE_CACHE_DIR_ENV = "STRATA_FEATURE_CACHE_DIR"
FEATURE_CACHE_BYTES_ENV = "STRATA_FEATURE_CACHE_BYTES"
DEFAULT_MAX_BYTES = 4 << 30
SUFFIX = ".npy"


def tensor_digest(*tensors: torch.Tensor, label: str = "") -> str:
    digest = hashlib.blake2b(label.encode(), digest_size=16)
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class SharedFeatureStore:
    """A folder of frozen-prefix outputs; every failure to read or write is a cache miss, never an error."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes

    @classmethod
    def from_env(cls) -> SharedFeatureStore | None:
        root = os.environ.get(FEATURE_CACHE_DIR_ENV)
        if not root:
            return None
        return cls(root, int(os.environ.get(FEATURE_CACHE_BYTES_ENV) or DEFAULT_MAX_BYTES))

    @staticmethod
    def key(prefix_digest: str, layers: int, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> str:
        return f"{prefix_digest[:16]}-{layers}-{tensor_digest(images, labels)[:16]}-{dtype}"

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def load(self, key: str, shape: tuple[int, ...], dtype: np.dtype, mmap: bool = False) -> np.ndarray | None:
        path = self.path(key)
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as error:
            log.warning("shared feature cache: dropping unreadable %s (%s)", path.name, error)
            _remove(path)
            return None
        if array.shape != shape or array.dtype != dtype:
            log.warning("shared feature cache: dropping %s (%s %s, expected %s %s)", path.name, array.shape,
                        array.dtype, shape, np.dtype(dtype))
            _remove(path)
            return None
        try:
            os.utime(path)  # recently used: evicted last
        except OSError:
            pass
        return array

    def new_file(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.memmap, Path] | None:
        """An array to fill in a hidden file of the folder; `commit` makes it visible under `key`."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".partial")
            os.close(handle)
            return np.lib.format.open_memmap(name, mode="w+", dtype=dtype, shape=shape), Path(name)
        except (OSError, ValueError) as error:
            log.warning("shared feature cache unavailable (%s): computing this trial's features privately", error)
            return None

    def commit(self, key: str, array: np.memmap, partial: Path) -> bool:
        try:
            array.flush()
            os.replace(partial, self.path(key))
        except OSError as error:
            log.warning("shared feature cache: could not store %s (%s)", key, error)
            _remove(partial)
            return False
        self.evict(keep=self.path(key))
        return True

    def discard(self, partial: Path) -> None:
        _remove(partial)

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used files until the folder fits `max_bytes` (a file being read stays readable)."""
        entries = []
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda entry: entry[0]):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            _remove(path)
            total -= size


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:  # the store is a cache: what cannot be removed is only space lost
        log.warning("shared feature cache: could not remove %s (%s)", path, error)
