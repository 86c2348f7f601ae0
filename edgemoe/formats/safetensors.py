"""Index Hugging Face checkpoint directories: config.json + *.safetensors, memory-mapped, zero-copy."""

from __future__ import annotations

import json
import os
import struct
from glob import glob

import numpy as np
from gguf import GGMLQuantizationType
from safetensors import SafetensorError, safe_open

from ..errors import ModelFormatError, UnsupportedError
from ..qtensor import QTensor

# safetensors dtype → (numpy storage dtype, engine type). BF16 has no numpy dtype: kept as uint16 bits.
_DTYPES = {
    "F32": (np.float32, GGMLQuantizationType.F32),
    "F16": (np.float16, GGMLQuantizationType.F16),
    "BF16": (np.uint16, GGMLQuantizationType.BF16),
}


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


MAX_CONFIG_BYTES = 1 << 20  # a model's config.json is a few kB


def read_config(path: str) -> dict:
    """config.json as a dict; anything else (not JSON, not UTF-8, not an object, absurdly large) is one error."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        cfg = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON, UTF-8, int digits
        raise ModelFormatError(f"{cfg_path}: unreadable config ({type(e).__name__}: {str(e)[:80]}); restore the "
                               "checkpoint's config.json") from None
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{cfg_path}: the top level is a {type(cfg).__name__}, not an object; restore the "
                               "checkpoint's config.json")
    return cfg


class SafetensorsIndex:
    """Name → (file, dtype, shape, byte range) for every tensor of a checkpoint directory.

    The byte ranges come from each file's header (the format's documented 8-byte length + JSON);
    safetensors itself validates every file first. Tensors are `np.memmap` views, never copied.
    """

    def __init__(self, path: str):
        files = sorted(glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ModelFormatError(f"{path}: no *.safetensors files; edgemoe reads safetensors checkpoints or GGUF files")
        self.entries: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for fn in files:
            try:
                with safe_open(fn, "np") as f:
                    names = list(f.keys())
            except (SafetensorError, OSError) as e:
                raise ModelFormatError(f"{fn}: not a valid safetensors file ({e}); re-download it") from None
            with open(fn, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            base = 8 + n
            for name in names:
                h = header[name]
                lo, hi = h["data_offsets"]
                self.entries[name] = (fn, h["dtype"], tuple(h["shape"]), base + lo, base + hi)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def keys(self):
        return self.entries.keys()

    def array(self, name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
        """The tensor as stored (float32/float16 array or uint16 BF16 bits) and its engine type."""
        fn, dtype, shape, lo, hi = self.entries[name]
        if dtype not in _DTYPES:
            raise UnsupportedError(f"tensor {name}: dtype {dtype} is not supported (F32, F16, BF16); convert the checkpoint")
        np_dtype, qtype = _DTYPES[dtype]
        if fn not in self._maps:
            self._maps[fn] = np.memmap(fn, dtype=np.uint8, mode="r")
        raw = self._maps[fn][lo:hi]
        return raw.view(np_dtype).reshape(shape), qtype

    def raw_bytes(self, name: str, n_dims: int) -> np.ndarray:
        """A uint8 ("U8") tensor of `n_dims` dimensions as stored (packed quantised blocks, E8M0 scales)."""
        self._dims(name, n_dims)
        fn, dtype, shape, lo, hi = self.entries[name]
        if dtype != "U8":
            raise ModelFormatError(f"tensor {name} is {dtype}, expected U8 (packed blocks); the checkpoint is corrupt")
        if fn not in self._maps:
            self._maps[fn] = np.memmap(fn, dtype=np.uint8, mode="r")
        return self._maps[fn][lo:hi].reshape(shape)

    def _dims(self, name: str, n: int) -> None:
        shape = self.entries[name][2]
        if len(shape) != n:
            raise ModelFormatError(f"tensor {name} has {len(shape)} dimensions {shape}, expected {n}; the checkpoint "
                                   "is of another architecture or corrupt")

    def vector(self, name: str) -> np.ndarray:
        """A 1-D tensor (norm weights) as float32."""
        self._dims(name, 1)
        a, qtype = self.array(name)
        if qtype == GGMLQuantizationType.BF16:
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(a, dtype=np.float32)

    def matrix(self, name: str) -> QTensor:
        self._dims(name, 2)
        a, qtype = self.array(name)
        return QTensor.from_array(a, qtype, a.shape[0], a.shape[1])

    def matrices(self, name: str) -> list[QTensor]:
        """A 3-D tensor (E, out, in) → one zero-copy QTensor per leading index."""
        self._dims(name, 3)
        a, qtype = self.array(name)
        return [QTensor.from_array(a[e], qtype, a.shape[1], a.shape[2]) for e in range(a.shape[0])]
