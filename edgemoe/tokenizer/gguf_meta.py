"""GGUF key/value metadata as plain Python values, read fast.

gguf.GGUFReader builds NumPy views for every array item, which costs seconds for a 150k-token
vocabulary; load_tokenizer(path) only needs the metadata, so it parses the key/value section here
(strings decoded as UTF-8, numeric arrays as NumPy arrays) and never touches the tensor data.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from ..errors import ModelFormatError

_SCALAR = {  # GGUFValueType -> struct code
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}


class _Cursor:
    """Sequential reads from a buffer in the file's byte order."""

    def __init__(self, buf: mmap.mmap, endian: str):
        self.buf, self.pos, self.endian = buf, 0, endian

    def scalar(self, code: str) -> Any:
        (v,) = struct.unpack_from(self.endian + code, self.buf, self.pos)
        self.pos += struct.calcsize(code)
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ModelFormatError("GGUF string runs past the end of the file")
        s = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, n = self.scalar("I"), self.scalar("Q")
            if item_type in _SCALAR:
                code = _SCALAR[GGUFValueType(item_type)]
                dt = np.dtype(code).newbyteorder(self.endian)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr
            return [self.value(item_type) for _ in range(n)]
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[GGUFValueType(vtype)])
        raise ModelFormatError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key/value pair of a GGUF file (ModelFormatError if it is not a readable GGUF file)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise ModelFormatError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
            endian = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
            cur = _Cursor(buf, endian)
            cur.pos = 4
            version = cur.scalar("I")
            if version < 2:
                raise ModelFormatError(f"{path} is GGUF version {version}; re-convert it with a current llama.cpp")
            cur.scalar("Q")  # tensor count
            n_kv = cur.scalar("Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                meta[key] = cur.value(cur.scalar("I"))
            return meta
    except (OSError, ValueError, struct.error, IndexError) as e:
        raise ModelFormatError(f"cannot read GGUF metadata from {path}: {e}") from e


def metadata_from_reader(reader: GGUFReader) -> dict[str, Any]:
    """The general.* and tokenizer.* keys of an open GGUFReader, in read_gguf_metadata's form."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith(("general.", "tokenizer.")) or not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            items = [field.parts[i] for i in field.data]
            if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
                meta[key] = [bytes(p).decode("utf-8", errors="replace") for p in items]
            elif len(field.types) > 1 and field.types[1] in _SCALAR:
                meta[key] = np.concatenate(items) if items else np.zeros(0)
            else:
                meta[key] = field.contents()
        elif field.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(field.parts[-1]).decode("utf-8", errors="replace")
        else:
            meta[key] = field.contents()
    return meta
