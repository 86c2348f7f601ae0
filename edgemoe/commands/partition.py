"""`edgemoe partition SRC -o PACK.gguf`: write an expert pack (and PACK.manifest.json) from a GGUF or HF model."""

from __future__ import annotations

import os
import sys
import time

from ..config import add_config_arguments


def setup_arg_parser(p) -> None:
    p.add_argument("source", help="GGUF file of any supported family, or an HF Mixtral checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="pack to write, e.g. model.pack.gguf; the manifest "
                   "goes beside it (model.pack.manifest.json)")
    p.add_argument("--quant", help="storage of the routed experts: Q4_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, "
                   "F16, BF16, F32 (default: as in the source; a GGUF's tensors are then copied byte for byte)")
    p.add_argument("--dense-quant", metavar="TYPE", help="storage of the other matrices (attention, embeddings, "
                   "output); norms and the router stay F32 (default: as in the source)")
    p.add_argument("--vocab-from", metavar="GGUF", help="HF source only: a GGUF file whose tokenizer (same "
                   "vocab_size) the pack carries; without it an HF source's pack has no vocabulary")
    p.add_argument("--verify", action="store_true", help="re-read the written pack and check every expert's checksum")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_config_arguments(p)  # --config FILE / --set KEY=VALUE: inference.quantization is the --quant default


def main(args) -> int:
    from ..config import config_from_args
    from ..partition import manifest_path, partition, verify_pack

    quant = args.quant
    if quant is None and (args.config or args.overrides):
        configured = config_from_args(args).inference.quantization
        quant = None if configured == "auto" else configured
    t0 = time.perf_counter()
    manifest = partition(args.source, args.output, quant=quant, dense_quant=args.dense_quant, vocab_from=args.vocab_from,
                         progress=False if args.quiet else None)
    dt = time.perf_counter() - t0
    if manifest["source_format"] == "safetensors" and args.vocab_from is None:
        print("edgemoe: note: the pack has no vocabulary (HF tokenizers are not converted); run it with "
              "--prompt-ids, or partition again with --vocab-from a GGUF of this model", file=sys.stderr)
    size = manifest["pack_bytes"]
    print(f"wrote {args.output} ({len(manifest['experts'])} experts, {size / 1e9:.2f} GB, "
          f"{size / 1e9 / max(dt, 1e-9):.2f} GB/s) and {os.path.basename(manifest_path(args.output))} in {dt:.1f} s")
    if args.verify:
        problems = verify_pack(args.output)
        for p in problems:
            print(f"edgemoe: verify: {p}", file=sys.stderr)
        if problems:
            return 1
        print(f"verified {len(manifest['experts'])} expert checksums")
    return 0
