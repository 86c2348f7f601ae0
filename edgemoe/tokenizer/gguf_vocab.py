"""Build a Tokenizer from GGUF tokenizer metadata, following llama.cpp's llama-vocab.cpp.

"llama" (SentencePiece) vocabularies become a `tokenizers` BPE whose merges are every split of a
vocabulary piece into two pieces, ranked by the piece's score: that is what llama.cpp's
llm_tokenizer_spm does (merge the highest-scoring adjacent pair first), with byte fallback for
characters outside the vocabulary. "gpt2" vocabularies become a byte-level BPE with the file's
merges and the pre-tokenizer regexes `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import tokenizers
from tokenizers import models

from ..errors import ModelFormatError, UnsupportedError
from .core import EncodeFn, SpecialToken, Tokenizer, partition_special
from .pieces import CONTROL, NORMAL, SPM_SPACE, UNKNOWN, USER_DEFINED, gguf_token_bytes
from .pretokenizers import build_pre_tokenizer, pre_tokenizer_spec

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("llama", "gpt2")

# Token texts llama.cpp treats as end of generation (and forces to control type), llama-vocab.cpp.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    # fill-in-the-middle pad / repo / file-separator tokens also end generation in llama.cpp
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<reponame>",
    "<|file_sep|>",
})


def _id(meta: Mapping[str, Any], key: str, n: int, default: int | None = None) -> int | None:
    v = meta.get(f"tokenizer.ggml.{key}", default)
    return int(v) if v is not None and 0 <= int(v) < n else None


def _array(meta: Mapping[str, Any], key: str, n: int, default: float) -> np.ndarray:
    v = meta.get(key)
    if v is None:
        return np.full(n, default)
    a = np.asarray(v)
    if a.ndim != 1 or len(a) < n:
        raise ModelFormatError(f"{key} has {a.size} entries for {n} tokens; the GGUF vocabulary is damaged")
    return a[:n]


def _spm_merges(tokens: list[str], vocab: dict[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, best piece score first."""
    ranked = []
    for i, t in enumerate(tokens):
        if vocab.get(t) != i:
            continue  # a duplicate spelling; llama.cpp's token_to_id keeps the last
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _bpe_merges(meta: Mapping[str, Any], vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    raw = meta.get("tokenizer.ggml.merges")
    if not isinstance(raw, list):
        raise ModelFormatError(f"{source} has a gpt2 vocabulary without tokenizer.ggml.merges; re-convert the model")
    merges = []
    for m in raw:
        k = m.find(" ", 1)  # as llama.cpp: the first space after the first character separates the pair
        if k < 0:
            continue
        left, right = m[:k], m[k + 1:]
        if left in vocab and right in vocab and left + right in vocab:  # tokenizers rejects the others
            merges.append((left, right))
    return merges


def _eog_ids(tokens: list[str], types: list[int], meta: Mapping[str, Any]) -> set[int]:
    """End-of-generation ids by llama.cpp's rules; marks the ones found by name as control tokens."""
    n = len(tokens)
    ids = {i for i in (_id(meta, k, n) for k in ("eos_token_id", "eot_token_id", "eom_token_id")) if i is not None}
    for i, t in enumerate(tokens):
        if t in EOG_TEXTS:
            ids.add(i)
            types[i] = CONTROL
    texts = {tokens[i] for i in ids}
    if "<|end|>" in texts and ({"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts):
        ids -= {i for i in ids if tokens[i] == "<|end|>"}  # gpt-oss / solar-open: "<|end|>" ends a message only
    return ids


def _specials(tokens: list[str], types: list[int], model_name: str) -> list[SpecialToken]:
    """llama.cpp's special-token cache: control, user-defined and unknown tokens, longest first."""
    ids = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
    ids.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
    phi3 = "phi-3" in model_name or "phi3" in model_name  # llama.cpp sets rstrip on Phi-3's specials
    no_rstrip = {"<unk>", "<s>", "<|endoftext|>"}
    return [SpecialToken(tokens[i], i, types[i] != USER_DEFINED, rstrip=phi3 and tokens[i] not in no_rstrip)
            for i in ids]


def tokenizer_from_metadata(meta: Mapping[str, Any], source: str = "GGUF file") -> Tokenizer:
    """A Tokenizer from read_gguf_metadata()/metadata_from_reader() output."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or model in ("no_vocab", "none"):
        raise ModelFormatError(f"{source} carries no vocabulary (tokenizer.ggml.model is {model!r}); "
                               "use a GGUF with tokenizer metadata or the model's Hugging Face directory")
    if model not in SUPPORTED_MODELS:
        raise UnsupportedError(f"tokenizer model {model!r} in {source} is not supported; supported: "
                               "'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFormatError(f"{source} has no tokenizer.ggml.tokens list; the GGUF vocabulary is missing or damaged")
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp does
    n = len(tokens)
    types = [int(t) for t in _array(meta, "tokenizer.ggml.token_type", n, NORMAL)]
    spm = model == "llama"
    eos_ids = _eog_ids(tokens, types, meta)
    specials = _specials(tokens, types, str(meta.get("general.name", "")).lower())
    vocab = {t: i for i, t in enumerate(tokens)}

    if spm:
        scores = _array(meta, "tokenizer.ggml.scores", n, 0.0)
        unk = _id(meta, "unknown_token_id", n, 0)
        bpe = models.BPE(vocab=vocab, merges=_spm_merges(tokens, vocab, scores), byte_fallback=True,
                         unk_token=tokens[unk] if unk is not None else None)
        backend = tokenizers.Tokenizer(bpe)
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        encode_fn = _spm_encoder(backend, specials, add_space_prefix)
        clean_spaces, default_bos, kind = False, True, "gguf llama"
        bos, eos = _id(meta, "bos_token_id", n, 1), _id(meta, "eos_token_id", n, 2)
    else:
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if "tokenizer.ggml.pre" not in meta:
            log.warning("%s has no tokenizer.ggml.pre; using the 'default' pre-tokenizer, as llama.cpp does", source)
        spec = pre_tokenizer_spec(pre)
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(meta, vocab, source),
                                                  ignore_merges=spec.ignore_merges))
        backend.pre_tokenizer = build_pre_tokenizer(spec)
        encode_fn = _bpe_encoder(backend, specials)
        add_space_prefix, clean_spaces, default_bos, kind = False, spec.clean_spaces, spec.add_bos, f"gguf gpt2/{pre}"
        bos, eos = _id(meta, "bos_token_id", n), _id(meta, "eos_token_id", n)

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    return Tokenizer(
        pieces=tokens,
        piece_bytes=[gguf_token_bytes(t, ty, byte_level=not spm) for t, ty in zip(tokens, types)],
        hidden=[ty in (CONTROL, UNKNOWN) for ty in types],
        encode_fn=encode_fn,
        bos_id=bos,
        eos_id=eos,
        eos_ids=eos_ids,
        add_bos=default_bos if add_bos is None else bool(add_bos),
        add_space_prefix=add_space_prefix,
        clean_spaces=clean_spaces,
        kind=kind,
    )


def _spm_encoder(backend: tokenizers.Tokenizer, specials: list[SpecialToken], add_space_prefix: bool) -> EncodeFn:
    def encode(text: str, special: bool) -> list[int]:
        ids: list[int] = []
        prev_special = True  # llama.cpp prefixes a space to the first fragment and to any after a special token
        for frag in partition_special(text, specials, special):
            if type(frag) is int:
                ids.append(frag)
                prev_special = True
                continue
            if add_space_prefix and prev_special:
                frag = " " + frag
            ids.extend(backend.encode(frag.replace(" ", SPM_SPACE), add_special_tokens=False).ids)
            prev_special = False
        return ids

    return encode


def _bpe_encoder(backend: tokenizers.Tokenizer, specials: list[SpecialToken]) -> EncodeFn:
    def encode(text: str, special: bool) -> list[int]:
        ids: list[int] = []
        for frag in partition_special(text, specials, special):
            if type(frag) is int:
                ids.append(frag)
            else:
                ids.extend(backend.encode(frag, add_special_tokens=False).ids)
        return ids

    return encode
