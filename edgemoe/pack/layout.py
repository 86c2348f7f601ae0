"""Write an expert pack: dense tensors first, then each expert's gate/up/down adjacent, every tensor on a
4096-byte boundary, plus the `PACK.manifest.json` sidecar that says where each expert's bytes are.

Both files are written under temporary names and renamed at the end, the manifest last (an existing
manifest at the final name is removed first), so an interrupted run never leaves a pack that looks
complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

from gguf import GGUFWriter

from ..errors import UsageError
from .manifest import CHECKSUM, FORMAT_VERSION, KEY_SOURCE, KEY_VERSION, PACK_ALIGNMENT, PROJS, manifest_path
from .stream import Layout, TensorJob, write_gguf


@dataclass(frozen=True)
class ExpertJobs:
    """One routed expert's three matrices, named `blk.{layer}.ffn_{gate,up,down}.{expert}.weight`."""

    layer: int
    expert: int
    gate: TensorJob  # (I, D)
    up: TensorJob  # (I, D)
    down: TensorJob  # (D, I)


@dataclass
class PackPlan:
    """Everything a pack is written from."""

    writer: GGUFWriter  # arch "llama", model and tokenizer metadata already added
    dense: list[TensorJob]  # every non-expert tensor, in file order
    experts: list[ExpertJobs]
    source: str  # where the weights came from (a path, or "synthetic:…")
    source_format: str  # "gguf" | "safetensors" | "synthetic"
    model: dict  # identity for the manifest: name, shape


def write_pack(path: str | os.PathLike, plan: PackPlan, *, progress: bool | None = None) -> dict:
    """Write `plan` as a pack at `path` and its manifest beside it; return the manifest."""
    path = os.fspath(path)
    man_path = manifest_path(path)
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; pass the pack's file name, e.g. {os.path.join(path, 'model.pack.gguf')}")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise UsageError(f"output directory {out_dir} does not exist; create it first")

    experts = sorted(plan.experts, key=lambda x: (x.layer, x.expert))
    w = plan.writer
    w.add_custom_alignment(PACK_ALIGNMENT)
    w.add_uint32(KEY_VERSION, FORMAT_VERSION)
    w.add_string(KEY_SOURCE, plan.source)
    jobs = list(plan.dense)
    groups = []
    for x in experts:
        groups.append((len(jobs), len(jobs) + 2))
        jobs += [x.gate, x.up, x.down]

    tmp, man_tmp = path + ".tmp", man_path + ".tmp"
    try:
        layout = write_gguf(w, tmp, jobs, groups=groups, progress=progress, desc=f"packing {os.path.basename(path)}")
        manifest = _manifest(plan, experts, layout)
        with open(man_tmp, "w") as f:
            f.write(_dumps(manifest))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(man_path):  # a stale manifest must never describe the new pack
            os.remove(man_path)
        os.replace(tmp, path)
        os.replace(man_tmp, man_path)
    except BaseException:
        for p in (tmp, man_tmp):
            if os.path.exists(p):
                os.remove(p)
        raise
    _fsync_dir(out_dir)
    return manifest


def _manifest(plan: PackPlan, experts: list[ExpertJobs], layout: Layout) -> dict:
    n_dense = len(plan.dense)
    entries = []
    for k, x in enumerate(experts):
        first = n_dense + 3 * k
        start = layout.offsets[first]
        assert start % PACK_ALIGNMENT == 0, (x.layer, x.expert, start)
        parts, used = {}, 0
        for j, proj in enumerate(PROJS):
            job: TensorJob = getattr(x, proj)
            rows, cols = job.shape
            parts[proj] = {"offset": layout.offsets[first + j] - start, "length": job.nbytes, "rows": rows,
                           "cols": cols, "quantization": job.qtype.name}
            used += job.nbytes
        length = parts["down"]["offset"] + parts["down"]["length"]
        types = [parts[p]["quantization"] for p in PROJS]
        entries.append({
            "layer": x.layer,
            "expert": x.expert,
            "quantization": types[0] if len(set(types)) == 1 else ",".join(f"{p}:{t}" for p, t in zip(PROJS, types)),
            "byte_offset": start,
            "byte_length": length,
            "alignment_padding": length - used,
            "checksum": f"{layout.group_crcs[k]:08x}",
            "parts": parts,
        })
    return {
        "format_version": FORMAT_VERSION,
        "source": plan.source,
        "source_format": plan.source_format,
        "model": plan.model,
        "quantization": {
            "dense": dict(Counter(j.qtype.name for j in plan.dense)),
            "experts": dict(Counter(getattr(x, p).qtype.name for x in experts for p in PROJS)),
        },
        "alignment": PACK_ALIGNMENT,
        "checksum": CHECKSUM,
        "pack_bytes": layout.file_bytes,
        "experts_offset": entries[0]["byte_offset"] if entries else layout.file_bytes,
        "experts": entries,
    }


def _dumps(manifest: dict) -> str:
    """JSON with one line per expert: thousands of experts stay readable and diffable."""
    head = json.dumps({k: v for k, v in manifest.items() if k != "experts"}, indent=1)
    experts = ",\n".join("  " + json.dumps(x) for x in manifest["experts"])
    return f'{head[:-2]},\n "experts": [\n{experts}\n ]\n}}\n'


def _fsync_dir(d: str) -> None:
    """Make the renames durable (best effort: some file systems refuse to fsync a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
