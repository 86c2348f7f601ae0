"""`edgemoe partition`: convert a MoE GGUF file (any supported family) or an HF Mixtral checkpoint into an expert
pack + manifest.

The pack is a GGUF (general.alignment 4096) with the dense tensors first, then every routed expert's
gate/up/down tensors adjacent, so one aligned read fetches an expert; the engine and llama.cpp load it
as an ordinary GGUF. See `edgemoe.pack.manifest` for the manifest's fields.
"""

from __future__ import annotations

import os

from gguf import GGMLQuantizationType

from .errors import ModelFormatError, UsageError
from .formats.gguf import is_gguf
from .formats.gguf_export import _parse_qtype
from .formats.safetensors import is_checkpoint_dir
from .pack.layout import write_pack
from .pack.manifest import manifest_path, read_manifest, verify_pack

__all__ = ["partition", "parse_type", "read_manifest", "verify_pack", "manifest_path"]


def parse_type(name: str | None, what: str) -> GGMLQuantizationType | None:
    """'Q4_K' (or 'q4k') → the type; None stays None. UsageError/UnsupportedError for other names."""
    if name is None:
        return None
    spelled = str(name).upper()
    if "_" not in spelled and spelled[:2] in ("Q4", "Q8", "Q5", "Q6") and len(spelled) == 3:
        spelled = spelled[:2] + "_" + spelled[2:]  # the seed article's "Q4K" spelling
    return _parse_qtype(spelled, what)


def partition(src: str | os.PathLike, out: str | os.PathLike, *, quant: str | None = None,
              dense_quant: str | None = None, vocab_from: str | os.PathLike | None = None,
              progress: bool | None = None) -> dict:
    """Write the pack of `src` (GGUF file or HF checkpoint directory) at `out`, its manifest beside it.

    quant / dense_quant: storage of the routed experts / of the other matrices (F32, F16, BF16, Q8_0, Q4_0,
    Q4_K); None keeps each tensor as the source stores it (a GGUF's tensors are then copied byte for
    byte). Norms and the router always stay as stored (F32 from an HF checkpoint). vocab_from: a GGUF
    whose tokenizer keys an HF source's pack gets. Returns the manifest.
    """
    src, out = os.fspath(src), os.fspath(out)
    expert_type, dense_type = parse_type(quant, "--quant"), parse_type(dense_quant, "--dense-quant")
    if not os.path.exists(src):
        raise ModelFormatError(f"{src}: no such file or directory; pass a .gguf file or an HF checkpoint directory")
    if os.path.exists(out) and os.path.samefile(src, out):
        raise UsageError(f"the output {out} is the source itself; write the pack to a new file")
    if os.path.isdir(src):
        if not is_checkpoint_dir(src):
            raise ModelFormatError(f"{src}: directory has no config.json; pass an HF checkpoint directory or a .gguf file")
        from .pack.sources import plan_from_hf

        plan = plan_from_hf(src, expert_type=expert_type, dense_type=dense_type,
                            vocab_from=None if vocab_from is None else os.fspath(vocab_from))
    elif is_gguf(src):
        if vocab_from is not None:
            raise UsageError("--vocab-from is for HF checkpoints; a GGUF source's own tokenizer is copied")
        from .pack.sources import plan_from_gguf

        plan = plan_from_gguf(src, expert_type=expert_type, dense_type=dense_type)
    else:
        raise ModelFormatError(f"{src}: neither a GGUF file nor an HF checkpoint directory")
    return write_pack(out, plan, progress=progress)
