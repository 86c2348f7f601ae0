"""`edgemoe tokenize -m MODEL TEXT`: token ids and pieces; works on vocabulary-only GGUF files too."""

from __future__ import annotations

import json


def setup_arg_parser(p) -> None:
    p.add_argument("-m", "--model", required=True, help="GGUF file (vocabulary-only is fine) or HF directory")
    p.add_argument("--json", action="store_true", help="print one JSON object: ids and pieces")
    p.add_argument("--no-bos", action="store_true", help="do not add the beginning-of-sequence token")
    p.add_argument("--ids-only", action="store_true", help="print only the ids, space-separated")
    p.add_argument("text", help="the text to tokenize")


def main(args) -> int:
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text, add_bos=False if args.no_bos else None)
    pieces = [tok.token_to_piece(i) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces}, ensure_ascii=False))
    elif args.ids_only:
        print(" ".join(map(str, ids)))
    else:
        for i, piece in zip(ids, pieces):
            print(f"{i:>8} {piece!r}")
    return 0
