"""A GGUF file as an editable image (metadata, tensor infos, data), written back byte for byte, so tests
can build files that no well-behaved writer would: wrong types, bad shapes, offsets past the end.

Read with gguf's own reader; written with the layout of the GGUF v3 spec (little-endian): magic,
version u32, tensor count u64, kv count u64, key/value pairs, tensor infos, padding to the alignment,
tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
from gguf import GGUFReader, GGUFValueType

_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


@dataclass
class KV:
    key: bytes
    vtype: int  # GGUFValueType
    value: object  # scalar, bytes for STRING, (elem_type, list) for ARRAY


@dataclass
class TensorInfo:
    name: bytes
    dims: list[int]  # ggml order: dims[0] = columns
    ggml_type: int
    offset: int  # relative to the start of the data section


@dataclass
class GGUFImage:
    kvs: list[KV]
    tensors: list[TensorInfo]
    data: bytearray
    version: int = 3
    alignment: int = 32
    tail: bytes = field(default=b"")  # appended after the data (or the file is cut by `truncate_at`)

    @classmethod
    def read(cls, path: str) -> GGUFImage:
        r = GGUFReader(path)
        kvs = []
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            t = GGUFValueType(f.types[0])
            if t == GGUFValueType.ARRAY:
                et = GGUFValueType(f.types[1])
                items = [bytes(f.parts[i]) if et == GGUFValueType.STRING else f.parts[i][0].item() for i in f.data]
                kvs.append(KV(name.encode(), t, (et, items)))
            elif t == GGUFValueType.STRING:
                kvs.append(KV(name.encode(), t, bytes(f.parts[-1])))
            else:
                kvs.append(KV(name.encode(), t, f.parts[-1][0].item()))
        tensors = [TensorInfo(t.name.encode(), [int(x) for x in t.shape], int(t.tensor_type),
                              int(t.data_offset) - int(r.data_offset)) for t in r.tensors]
        align = r.fields.get("general.alignment")
        data = bytearray(np.asarray(r.data[r.data_offset:]).tobytes())
        return cls(kvs, tensors, data, alignment=int(align.parts[-1][0]) if align else 32)

    def kv(self, key: str) -> KV | None:
        return next((k for k in self.kvs if k.key == key.encode()), None)

    def set(self, key: str, vtype: int, value) -> None:
        kv = self.kv(key)
        if kv is None:
            self.kvs.append(KV(key.encode(), vtype, value))
        else:
            kv.vtype, kv.value = vtype, value

    def drop(self, key: str) -> None:
        self.kvs = [k for k in self.kvs if k.key != key.encode()]

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name.encode())

    def remove_tensor(self, name: str) -> None:
        """Drop a tensor and its bytes, as a writer that never had it would lay the file out."""
        t = self.tensor(name)
        later = sorted((u for u in self.tensors if u.offset > t.offset), key=lambda u: u.offset)
        end = later[0].offset if later else len(self.data)
        del self.data[t.offset:end]
        for u in later:
            u.offset -= end - t.offset
        self.tensors.remove(t)

    def write(self, path: str, truncate_at: int | None = None) -> None:
        out = bytearray(b"GGUF")
        out += struct.pack("<IQQ", self.version, len(self.tensors), len(self.kvs))
        for kv in self.kvs:
            out += _string(kv.key) + struct.pack("<I", kv.vtype) + _value(kv.vtype, kv.value)
        for t in self.tensors:
            out += _string(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d & (2**64 - 1)) for d in t.dims)
            out += struct.pack("<IQ", t.ggml_type & 0xFFFFFFFF, t.offset & (2**64 - 1))
        out += b"\0" * (-len(out) % self.alignment)
        out += self.data + self.tail
        with open(path, "wb") as f:
            f.write(bytes(out[:truncate_at]) if truncate_at is not None else bytes(out))


def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value if isinstance(value, bytes) else str(value).encode())
    if vtype == GGUFValueType.ARRAY:
        et, items = value
        return struct.pack("<IQ", et, len(items)) + b"".join(_value(et, x) for x in items)
    fmt = _SCALAR[GGUFValueType(vtype)]
    if fmt[-1] in "fd":
        return struct.pack(fmt, float(value))
    size = struct.calcsize(fmt)  # integers of any sign wrap to the field's width, as a corrupt file may hold
    return (int(value) & ((1 << 8 * size) - 1)).to_bytes(size, "little")
