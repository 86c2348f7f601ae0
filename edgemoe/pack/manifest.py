"""The pack's sidecar manifest (`PACK.manifest.json`): read it, and check a pack against it.

Manifest (format_version 2; version 1 is read too):
    format_version, source, source_format ("gguf" | "safetensors" | "synthetic"), model {name, shape keys},
    quantization {"dense": {type: tensor count}, "experts": {type: tensor count}}, alignment (4096),
    checksum ("crc32c"; version 1: "crc32"), pack_bytes (file size), experts_offset (first expert's byte offset),
    experts: [{layer, expert, quantization, byte_offset, byte_length, alignment_padding, checksum, parts}]
An expert's range [byte_offset, byte_offset + byte_length) runs from the start of its gate tensor to the
end of its down tensor; byte_offset is a multiple of `alignment`; alignment_padding counts the zero bytes
inside the range (between gate, up and down); checksum is the range's CRC (pack/checksum.py) as 8 hex digits.
parts: {"gate" | "up" | "down": {offset (relative to byte_offset), length, rows, cols, quantization}}.

`read_manifest` checks every entry's types and bounds, so a damaged manifest is one ModelFormatError naming
the entry; `check_pack` is what the engine runs before it uses a pack's experts.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from ..errors import EdgeMoEError, ModelFormatError
from .checksum import update

FORMAT_VERSION = 2
PACK_ALIGNMENT = 4096
CHECKSUM = "crc32c"
READ_CHECKSUMS = {1: ("crc32",), 2: ("crc32", "crc32c")}  # format version → checksum algorithms it may name
KEY_VERSION = "edgemoe.pack.version"  # GGUF metadata: uint32 FORMAT_VERSION
KEY_SOURCE = "edgemoe.pack.source"  # GGUF metadata: where the weights came from
PROJS = ("gate", "up", "down")
PART_TENSOR = "blk.{i}.ffn_{proj}.{e}.weight"
_READ_BYTES = 16 << 20
_FIX = "run 'edgemoe partition' again"

log = logging.getLogger("edgemoe.pack")


def manifest_path(pack_path: str | os.PathLike) -> str:
    """`model.gguf` → `model.manifest.json`; any other name gets `.manifest.json` appended."""
    p = os.fspath(pack_path)
    return (p[: -len(".gguf")] if p.endswith(".gguf") else p) + ".manifest.json"


def read_manifest(pack_path: str | os.PathLike) -> dict:
    """The manifest of the pack at `pack_path`; ModelFormatError if it is missing, unreadable, of a newer format,
    or has a malformed entry (wrong types, negative offsets, ranges past `pack_bytes`, missing keys, duplicates)."""
    path = manifest_path(pack_path)
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: no manifest beside the pack (an interrupted 'edgemoe partition'?); "
                               "run the partition again") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, not UTF-8
        raise ModelFormatError(f"{path}: unreadable manifest ({type(e).__name__}: {str(e)[:80]}); {_FIX}") from None
    if not isinstance(m, dict) or not isinstance(m.get("experts"), list):
        raise ModelFormatError(f"{path}: not an edgemoe pack manifest; {_FIX}")
    version = m.get("format_version")
    if isinstance(version, bool) or version not in READ_CHECKSUMS:
        raise ModelFormatError(f"{path}: pack format version {version!r}, this edgemoe reads versions "
                               f"{', '.join(map(str, READ_CHECKSUMS))}; partition the model again")
    if m.get("checksum", "crc32") not in READ_CHECKSUMS[version]:
        raise ModelFormatError(f"{path}: checksum {str(m.get('checksum'))[:40]!r} is not one a version {version} "
                               f"manifest can name ({', '.join(READ_CHECKSUMS[version])}); {_FIX}")
    problem = _int_problem(m, "pack_bytes", 0)
    if problem is None and "alignment" in m:
        problem = _int_problem(m, "alignment", 1)
    if problem:
        raise ModelFormatError(f"{path}: {problem}; {_FIX}")
    seen: set[tuple[int, int]] = set()
    for n, x in enumerate(m["experts"]):
        problem = _entry_problem(x, m["pack_bytes"])
        if problem is None and (x["layer"], x["expert"]) in seen:
            problem = "a second entry for this expert"
        if problem is not None:
            raise ModelFormatError(f"{path}: experts[{n}]{_entry_name(x)}: {problem}; {_FIX}")
        seen.add((x["layer"], x["expert"]))
    return m


def _entry_name(x) -> str:
    if isinstance(x, dict) and all(_is_int(x.get(k)) for k in ("layer", "expert")):
        return f" (layer {x['layer']}, expert {x['expert']})"
    return ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_problem(d: dict, key: str, low: int) -> str | None:
    if key not in d:
        return f"'{key}' is missing"
    if not _is_int(d[key]) or d[key] < low:
        return f"'{key}' must be an integer >= {low}, got {str(d[key])[:40]!r}"
    return None


def _entry_problem(x, pack_bytes: int) -> str | None:
    """What is wrong with one `experts` entry, or None."""
    if not isinstance(x, dict):
        return f"an entry must be an object, got {type(x).__name__}"
    for key, low in (("layer", 0), ("expert", 0), ("byte_offset", 0), ("byte_length", 1)):
        problem = _int_problem(x, key, low)
        if problem:
            return problem
    crc = x.get("checksum")
    if not (isinstance(crc, str) and len(crc) == 8 and all(c in "0123456789abcdefABCDEF" for c in crc)):
        return f"'checksum' must be 8 hex digits (a CRC), got {str(crc)[:40]!r}"
    start, length = x["byte_offset"], x["byte_length"]
    if start + length > pack_bytes:
        return f"bytes {start}+{length} end past the pack's {pack_bytes} bytes"
    parts = x.get("parts")
    if not isinstance(parts, dict):
        return "'parts' must be an object with gate, up and down"
    for proj in PROJS:
        part = parts.get(proj)
        if not isinstance(part, dict):
            return f"'parts.{proj}' is missing or not an object"
        for key, low in (("offset", 0), ("length", 1), ("rows", 1), ("cols", 1)):
            problem = _int_problem(part, key, low)
            if problem:
                return f"parts.{proj}: {problem}"
        if not isinstance(part.get("quantization"), str):
            return f"parts.{proj}: 'quantization' must be a type name such as 'Q4_0'"
        if part["offset"] + part["length"] > length:
            return f"parts.{proj} ends at {part['offset'] + part['length']}, past the entry's {length} bytes"
    return None


def is_pack(path: str | os.PathLike) -> bool:
    """Whether a GGUF file carries the pack's version key (asked only when a manifest is missing)."""
    from gguf import GGUFReader

    from ..formats.gguf import metadata_keys

    keys = metadata_keys(os.fspath(path))  # the loader has read it already
    if keys is not None:
        return KEY_VERSION in keys
    try:
        return KEY_VERSION in GGUFReader(os.fspath(path), "r").fields
    except (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError, AssertionError):
        return False  # damaged: the loader says so


def checksum_algorithm(m: dict) -> str:
    """The CRC a manifest (as read_manifest returns it) records for its experts."""
    return m.get("checksum", "crc32")


def check_pack(pack_path: str | os.PathLike, *, checksums: bool) -> dict | None:
    """Before the engine uses a pack's experts: its manifest (None, with a one-line warning, when a pack has
    none; None, silently, for a GGUF that is no pack), the file's size against it, and with `checksums` every
    expert's CRC (one read of the experts). ModelFormatError names the first problem."""
    pack_path = os.fspath(pack_path)
    if not os.path.exists(manifest_path(pack_path)):
        if is_pack(pack_path):
            log.warning("%s: an expert pack without its manifest %s; its experts' checksums cannot be verified "
                        "(run 'edgemoe partition' again to write it)", pack_path, manifest_path(pack_path))
        return None
    m = read_manifest(pack_path)
    size = os.path.getsize(pack_path)
    if size != m["pack_bytes"]:
        raise ModelFormatError(f"{pack_path} is {size} bytes but its manifest says {m['pack_bytes']}: the pack is "
                               f"truncated or the manifest belongs to another pack; {_FIX}")
    if checksums:
        with open(pack_path, "rb") as f:
            for x in m["experts"]:
                crc = f"{_crc(f, checksum_algorithm(m), x['byte_offset'], x['byte_length']):08x}"
                if crc != x["checksum"].lower():
                    raise ModelFormatError(
                        f"{pack_path}: expert (layer {x['layer']}, expert {x['expert']}) has checksum {crc}, its "
                        f"manifest says {x['checksum']} (bytes {x['byte_offset']}+{x['byte_length']}): the pack is "
                        f"corrupt; {_FIX} or re-download it")
    return m


def verify_pack(pack_path: str | os.PathLike) -> list[str]:
    """Check a pack against its manifest: file size, GGUF tensor layout, alignment and every expert's CRC.

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
            crc = _crc(f, checksum_algorithm(m), start, length)
            if f"{crc:08x}" != x["checksum"].lower():
                problems.append(f"{where}: checksum {crc:08x} != manifest {x['checksum']} (bytes {start}+{length})")
    return problems


def _crc(f, algorithm: str, start: int, length: int) -> int:
    f.seek(start)
    crc, left = 0, length
    while left > 0:
        buf = f.read(min(left, _READ_BYTES))
        if not buf:
            break
        crc = update(algorithm, crc, np.frombuffer(buf, np.uint8))
        left -= len(buf)
    return crc
