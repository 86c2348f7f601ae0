"""Open GGUF files through the `gguf` package's memory-mapped reader, with errors a user can act on."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import ModelFormatError
from ..qtensor import QTensor, check_supported

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


_KEYS_SEEN: dict[tuple, frozenset] = {}  # file identity -> its metadata keys, for every GGUF opened here


def _file_identity(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def metadata_keys(path: str) -> frozenset | None:
    """The metadata keys of a GGUF file this process has opened (and that has not changed since); None
    otherwise. Parsing a file again costs seconds with a large vocabulary."""
    try:
        return _KEYS_SEEN.get(_file_identity(path))
    except OSError:
        return None


def open_gguf(path: str) -> GGUFReader:
    """Memory-map a GGUF file; a truncated or corrupt file raises ModelFormatError, not a traceback."""
    if not is_gguf(path):
        raise ModelFormatError(f"{path}: not a GGUF file (no 'GGUF' magic); pass a .gguf file or an HF checkpoint directory")
    try:
        reader = GGUFReader(path, "r")
        _KEYS_SEEN[_file_identity(path)] = frozenset(reader.fields)
        return reader
    except (ValueError, IndexError, OverflowError, KeyError, AssertionError, TypeError, MemoryError) as e:
        size = os.path.getsize(path)
        raise ModelFormatError(
            f"{path}: GGUF file is truncated or corrupt ({size} bytes; {str(e)[:80]}); download or convert it again"
        ) from None


def scalar_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every scalar (non-array) metadata key → Python value. Arrays (vocabularies) are left to their users."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        try:
            out[key] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise ModelFormatError(f"metadata key {key[:60]!r} is malformed ({type(e).__name__}); the file is "
                                   "corrupt, download or convert it again") from None
    return out


def tensor_index(reader: GGUFReader) -> dict[str, Any]:
    """Tensor name → ReaderTensor (zero-copy views into the mapping)."""
    return {t.name: t for t in reader.tensors}


def to_qtensor(t: Any) -> QTensor | np.ndarray:
    """A 1-D GGUF tensor → float32 array; a 2-D one → QTensor (zero-copy). 3-D tensors: see `expert_slices`."""
    qtype = check_supported(t.tensor_type, f"tensor {t.name}")
    ne = [int(x) for x in t.shape]  # ggml order: ne[0] = columns
    if len(ne) == 1:
        if qtype != GGMLQuantizationType.F32:
            from ..quants import dequantize  # small 1-D tensors only

            return dequantize(np.asarray(t.data).view(np.uint8).reshape(1, -1), qtype, ne[0])[0]
        return np.asarray(t.data, dtype=np.float32)
    if len(ne) != 2:
        raise ModelFormatError(f"tensor {t.name}: expected 2 dimensions, found {len(ne)}")
    cols, rows = ne
    return QTensor(np.asarray(t.data).view(np.uint8).reshape(rows, -1), qtype, rows, cols)


def expert_slices(t: Any) -> list[QTensor]:
    """A merged 3-D expert tensor (E, out, in) → one zero-copy QTensor per expert."""
    qtype = check_supported(t.tensor_type, f"tensor {t.name}")
    cols, rows, n_expert = (int(x) for x in t.shape)
    raw = np.asarray(t.data).view(np.uint8).reshape(n_expert, rows, -1)  # (E, out, row_bytes)
    return [QTensor(raw[e], qtype, rows, cols) for e in range(n_expert)]
