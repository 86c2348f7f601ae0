"""Build a Tokenizer from a Hugging Face model directory: tokenizer.json, else tokenizer.model.

Encoding is the `tokenizers` / `sentencepiece` library's own. Decoding goes through per-token bytes
(so that StreamDecoder can hold back split characters), derived from the tokenizer.json decoder:
byte-level (GPT-2 style) or SentencePiece style ('▁' as space, optional '<0xAB>' byte fallback).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import sentencepiece
import tokenizers

from ..errors import ModelFormatError, UnsupportedError
from .core import SpecialToken, Tokenizer, partition_special
from .gguf_vocab import EOG_TEXTS
from .pieces import SPM_SPACE, byte_level_bytes, byte_piece_value, spm_bytes


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    """config.json / generation_config.json token ids: an int, a list of ints, or null."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


def _special_ids(cfg: Mapping, model_cfg: Mapping, gen_cfg: Mapping, lookup) -> tuple[int | None, int | None, set[int]]:
    """(bos, eos, eos_ids) from tokenizer_config.json tokens, then config.json / generation_config.json ids."""

    def by_text(key: str) -> int | None:
        v = cfg.get(key)
        text = v.get("content") if isinstance(v, dict) else v
        return lookup(text) if isinstance(text, str) else None

    bos = by_text("bos_token")
    if bos is None:
        bos = next(iter(_ids(model_cfg.get("bos_token_id"))), None)
    eos_all = _ids(model_cfg.get("eos_token_id")) + _ids(gen_cfg.get("eos_token_id"))
    eos = by_text("eos_token")
    if eos is None:
        eos = next(iter(eos_all), None)
    eog = {i for i in (lookup(t) for t in EOG_TEXTS) if i is not None}
    return bos, eos, {*eos_all, *eog, *([eos] if eos is not None else [])}


def _walk(node: Any) -> list[dict]:
    """A tokenizer.json component and, for a Sequence, its members, flattened."""
    if not isinstance(node, dict):
        return []
    members = node.get("decoders") or node.get("processors") or []
    return [node, *(d for m in members for d in _walk(m))]


def _decoder_style(decoder: Any, path: str) -> tuple[str, bool, bool]:
    """(style, byte_fallback, strip_first_space) of a tokenizer.json decoder."""
    parts = _walk(decoder)
    types = {d.get("type") for d in parts}
    if "ByteLevel" in types:
        return "byte_level", False, False
    spm_replace = any(d.get("type") == "Replace" and d.get("pattern", {}).get("String") == SPM_SPACE for d in parts)
    if "Metaspace" in types or spm_replace:
        strip = any(d.get("type") == "Strip" and d.get("start", 0) >= 1 for d in parts) or any(
            d.get("type") == "Metaspace" and (d.get("prepend_scheme", "always") != "never" and d.get("add_prefix_space", True))
            for d in parts)
        return "spm", "ByteFallback" in types, strip
    raise UnsupportedError(f"{path}: decoder {sorted(t for t in types if t)} is not supported; "
                           "supported: ByteLevel (GPT-2 style) and SentencePiece style (Metaspace / '▁' Replace)")


def _adds_bos(cfg: Mapping, spec: Mapping, bos_piece: str | None) -> bool:
    """tokenizer_config.json add_bos_token, else whether the post-processor template starts with BOS."""
    if isinstance(cfg.get("add_bos_token"), bool):
        return cfg["add_bos_token"]
    for proc in _walk(spec.get("post_processor")):
        single = proc.get("single") if proc.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"].get("id") == bos_piece
    return False


def from_tokenizer_json(path: str, cfg: Mapping, model_cfg: Mapping, gen_cfg: Mapping) -> Tokenizer:
    """Tokenizer from a tokenizer.json (plus the directory's config files)."""
    spec = _read_json(path)
    try:
        hf = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise ModelFormatError(f"cannot load {path}: {e}") from e
    style, byte_fallback, strip_first = _decoder_style(spec.get("decoder"), path)
    n = hf.get_vocab_size(with_added_tokens=True)
    pieces = [hf.id_to_token(i) or "" for i in range(n)]
    hidden = [False] * n
    for i, tok in hf.get_added_tokens_decoder().items():
        if tok.special and i < n:
            hidden[i] = True

    def as_bytes(i: int, piece: str) -> bytes:
        if hidden[i]:
            return piece.encode("utf-8")
        if style == "byte_level":
            return byte_level_bytes(piece)
        if byte_fallback and byte_piece_value(piece) is not None:
            return spm_bytes(piece)
        return piece.replace(SPM_SPACE, " ").encode("utf-8")

    bos, eos, eos_ids = _special_ids(cfg, model_cfg, gen_cfg, hf.token_to_id)
    literal: list[tokenizers.Tokenizer] = []  # a copy that leaves special tokens in the text as text

    def encode(text: str, special: bool) -> list[int]:
        if special:
            return hf.encode(text, add_special_tokens=False).ids
        if not literal:
            clone = tokenizers.Tokenizer.from_str(hf.to_str())
            clone.encode_special_tokens = True
            literal.append(clone)
        return literal[0].encode(text, add_special_tokens=False).ids

    return Tokenizer(
        pieces=pieces, piece_bytes=[as_bytes(i, p) for i, p in enumerate(pieces)], hidden=hidden,
        encode_fn=encode, bos_id=bos, eos_id=eos, eos_ids=eos_ids,
        add_bos=_adds_bos(cfg, spec, pieces[bos] if bos is not None and bos < n else None),
        add_space_prefix=strip_first, clean_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
        kind="tokenizer.json")


def from_sentencepiece(path: str, cfg: Mapping, model_cfg: Mapping, gen_cfg: Mapping) -> Tokenizer:
    """Tokenizer from a SentencePiece tokenizer.model; control tokens in the text are split out first,
    as llama.cpp and transformers' LlamaTokenizer do, and each fragment is encoded by sentencepiece."""
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise ModelFormatError(f"cannot load SentencePiece model {path}: {e}") from e
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    hidden = [bool(sp.is_control(i) or sp.is_unknown(i)) for i in range(n)]

    def as_bytes(i: int, piece: str) -> bytes:
        if hidden[i]:
            return piece.encode("utf-8")
        if sp.is_unused(i):
            return b""
        return spm_bytes(piece) if sp.is_byte(i) else piece.replace(SPM_SPACE, " ").encode("utf-8")

    specials = sorted((SpecialToken(pieces[i], i, True) for i in range(n) if hidden[i]),
                      key=lambda s: -len(s.text.encode("utf-8")))

    def encode(text: str, special: bool) -> list[int]:
        ids: list[int] = []
        for frag in partition_special(text, specials, special):
            ids.extend([frag] if type(frag) is int else sp.encode(frag))
        return ids

    vocab = {p: i for i, p in enumerate(pieces)}
    bos, eos, eos_ids = _special_ids(cfg, model_cfg, gen_cfg, vocab.get)
    bos = bos if bos is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
    eos = eos if eos is not None else (sp.eos_id() if sp.eos_id() >= 0 else None)
    first = sp.encode("a", out_type=str)
    return Tokenizer(
        pieces=pieces, piece_bytes=[as_bytes(i, p) for i, p in enumerate(pieces)], hidden=hidden, encode_fn=encode,
        bos_id=bos, eos_id=eos, eos_ids=eos_ids | ({eos} if eos is not None else set()),
        add_bos=bool(cfg.get("add_bos_token", True)),
        add_space_prefix=bool(first) and first[0].startswith(SPM_SPACE),
        clean_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)), kind="sentencepiece")


def tokenizer_from_hf_dir(path: str) -> Tokenizer:
    """Tokenizer of a Hugging Face model directory (ModelFormatError if it has no tokenizer file)."""
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    model_cfg = _read_json(os.path.join(path, "config.json"))
    gen_cfg = _read_json(os.path.join(path, "generation_config.json"))
    tj, tm = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.exists(tj):
        return from_tokenizer_json(tj, cfg, model_cfg, gen_cfg)
    if os.path.exists(tm):
        return from_sentencepiece(tm, cfg, model_cfg, gen_cfg)
    raise ModelFormatError(f"{path} has neither tokenizer.json nor tokenizer.model; "
                           "copy the tokenizer files of the model into it")
