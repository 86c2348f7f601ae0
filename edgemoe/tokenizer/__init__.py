"""Tokenizers for edgemoe: load a vocabulary from a GGUF file or a Hugging Face directory.

    tok = load_tokenizer("model.gguf")          # or a directory with tokenizer.json / tokenizer.model
    ids = tok.encode("Hello")                   # BOS first when the vocabulary asks for it
    stream = StreamDecoder(tok)
    text = "".join(stream.push(i) for i in ids[1:]) + stream.flush()

Encoding matches llama.cpp (its tests/test-tokenizer-0 vectors) for GGUF "llama" and "gpt2" vocabularies.
"""

from __future__ import annotations

import os

from ..errors import ModelFormatError
from .core import SpecialToken, Tokenizer
from .gguf_meta import read_gguf_metadata
from .gguf_vocab import tokenizer_from_metadata
from .hf_vocab import tokenizer_from_hf_dir
from .stream import StreamDecoder, clean_up_spaces

__all__ = ["SpecialToken", "StreamDecoder", "Tokenizer", "clean_up_spaces", "load_tokenizer"]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a GGUF file (its metadata vocabulary; tensors are not needed) or of a Hugging
    Face directory (tokenizer.json, else tokenizer.model; tokenizer_config.json / config.json /
    generation_config.json for BOS/EOS). A path to tokenizer.json or tokenizer.model loads its directory."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return tokenizer_from_hf_dir(p)
    if not os.path.exists(p):
        raise ModelFormatError(f"{p} does not exist; pass a GGUF file or a Hugging Face model directory")
    if os.path.basename(p) in ("tokenizer.json", "tokenizer.model"):
        return tokenizer_from_hf_dir(os.path.dirname(p) or ".")
    return tokenizer_from_metadata(read_gguf_metadata(p), p)
