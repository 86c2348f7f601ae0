"""The pack's sidecar manifest (`PACK.manifest.json`): read it, and check a pack against it.

Manifest (format_version 1):
    format_version, source, source_format ("gguf" | "safetensors" | "synthetic"), model {name, shape keys},
    quantization {"dense": {type: tensor count}, "experts": {type: tensor count}}, alignment (4096),
    checksum ("crc32"), pack_bytes (file size), experts_offset (first expert's byte offset),
    experts: [{layer, expert, quantization, byte_offset, byte_length, alignment_padding, checksum, parts}]
An expert's range [byte_offset, byte_offset + byte_length) runs from the start of its gate tensor to the
end of its down tensor; byte_offset is a multiple of `alignment`; alignment_padding counts the zero bytes
inside the range (between gate, up and down); checksum is zlib.crc32 of the range as 8 hex digits.
parts: {"gate" | "up" | "down": {offset (relative to byte_offset), length, rows, cols, quantization}}.
"""

from __future__ import annotations

import json
import os
import zlib

from ..errors import EdgeMoEError, ModelFormatError

FORMAT_VERSION = 1
PACK_ALIGNMENT = 4096
CHECKSUM = "crc32"
KEY_VERSION = "edgemoe.pack.version"  # GGUF metadata: uint32 FORMAT_VERSION
KEY_SOURCE = "edgemoe.pack.source"  # GGUF metadata: where the weights came from
PROJS = ("gate", "up", "down")
PART_TENSOR = "blk.{i}.ffn_{proj}.{e}.weight"
_READ_BYTES = 16 << 20


def manifest_path(pack_path: str | os.PathLike) -> str:
    """`model.gguf` → `model.manifest.json`; any other name gets `.manifest.json` appended."""
    p = os.fspath(pack_path)
    return (p[: -len(".gguf")] if p.endswith(".gguf") else p) + ".manifest.json"


def read_manifest(pack_path: str | os.PathLike) -> dict:
    """The manifest of the pack at `pack_path`; ModelFormatError if it is missing, unreadable or of a newer format."""
    path = manifest_path(pack_path)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no manifest beside the pack (an interrupted 'edgemoe partition'?); "
                               "run the partition again") from None
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: unreadable manifest ({e}); run 'edgemoe partition' again") from None
    if not isinstance(m, dict) or not isinstance(m.get("experts"), list):
        raise ModelFormatError(f"{path}: not an edgemoe pack manifest; run 'edgemoe partition' again")
    if m.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: pack format version {m.get('format_version')!r}, this edgemoe reads "
                               f"version {FORMAT_VERSION}; partition the model again")
    return m


def verify_pack(pack_path: str | os.PathLike) -> list[str]:
    """Check a pack against its manifest: file size, GGUF tensor layout, alignment and every expert's CRC-32.

    Returns the problems found, one line each; an empty list means the pack is intact.
    """
    from ..formats.gguf import open_gguf

    pack_path = os.fspath(pack_path)
    try:
        m = read_manifest(pack_path)
        reader = open_gguf(pack_path)
    except EdgeMoEError as e:
        return [str(e)]
    problems = []
    size = os.path.getsize(pack_path)
    if m.get("pack_bytes") != size:
        problems.append(f"pack is {size} bytes, the manifest says {m.get('pack_bytes')}")
    align = m.get("alignment", PACK_ALIGNMENT)
    if reader.alignment != align:
        problems.append(f"GGUF general.alignment is {reader.alignment}, the manifest says {align}")
    tensors = {t.name: t for t in reader.tensors}
    with open(pack_path, "rb") as f:
        for x in m["experts"]:
            where = f"expert (layer {x['layer']}, expert {x['expert']})"
            start, length = x["byte_offset"], x["byte_length"]
            if start % align:
                problems.append(f"{where}: byte_offset {start} is not a multiple of {align}")
            if start + length > size:
                problems.append(f"{where}: range ends at {start + length}, past the end of the file ({size})")
                continue
            for proj in PROJS:
                part = x["parts"][proj]
                name = PART_TENSOR.format(i=x["layer"], proj=proj, e=x["expert"])
                t = tensors.get(name)
                if t is None:
                    problems.append(f"{where}: tensor {name} is missing from the pack")
                elif (t.data_offset != start + part["offset"] or int(t.n_bytes) != part["length"]
                      or t.tensor_type.name != part["quantization"]
                      or [int(n) for n in t.shape] != [part["cols"], part["rows"]]):
                    problems.append(f"{where}: tensor {name} does not match the manifest's {proj} entry")
            crc = _crc32(f, start, length)
            if f"{crc:08x}" != x["checksum"]:
                problems.append(f"{where}: checksum {crc:08x} != manifest {x['checksum']} (bytes {start}+{length})")
    return problems


def _crc32(f, start: int, length: int) -> int:
    f.seek(start)
    crc, left = 0, length
    while left > 0:
        buf = f.read(min(left, _READ_BYTES))
        if not buf:
            break
        crc = zlib.crc32(buf, crc)
        left -= len(buf)
    return crc
