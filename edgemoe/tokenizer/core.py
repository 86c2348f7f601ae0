"""The Tokenizer: text ⇄ token ids with llama.cpp's semantics, whatever file the vocabulary came from."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UsageError
from .stream import clean_up_spaces

if TYPE_CHECKING:
    import gguf

# (text, special) -> ids, no BOS. `special` says whether control tokens written in the text are parsed.
EncodeFn = Callable[[str, bool], list[int]]

_C_SPACE = " \t\n\v\f\r"  # C isspace(), which llama.cpp's lstrip/rstrip token attributes use


@dataclass(frozen=True)
class SpecialToken:
    """A token matched whole in the text before the vocabulary's own tokenization runs."""

    text: str
    id: int
    control: bool  # control/unknown: matched only when parsing special tokens; user-defined: always
    lstrip: bool = False  # eat whitespace to the token's left
    rstrip: bool = False  # eat whitespace to the token's right


def partition_special(text: str, specials: Sequence[SpecialToken], parse_control: bool) -> list[str | int]:
    """Split text into raw-text fragments and special-token ids, as llama.cpp's tokenizer_st_partition.

    Tokens are tried longest first (specials must be sorted so), each splitting every text fragment
    left so far at all its occurrences.
    """
    frags: list[str | int] = [text] if text else []
    for tok in specials:
        if tok.control and not parse_control:
            continue
        if not any(type(f) is str and tok.text in f for f in frags):
            continue
        out: list[str | int] = []
        for f in frags:
            if type(f) is not str or tok.text not in f:
                out.append(f)
                continue
            parts = f.split(tok.text)
            for k, part in enumerate(parts):
                if k > 0:
                    out.append(tok.id)
                    if tok.rstrip:
                        part = part.lstrip(_C_SPACE)
                if tok.lstrip and k < len(parts) - 1:
                    part = part.rstrip(_C_SPACE)
                if part:
                    out.append(part)
        frags = out
    return frags


class Tokenizer:
    """Encode text to token ids and decode ids to text.

    Attributes: vocab_size; bos_id / eos_id (None if the vocabulary has none); eos_ids, every id that
    ends generation (eos, end-of-turn, ...); add_bos, whether encode() prepends BOS by default;
    add_space_prefix, whether encoding puts a space before the text (SentencePiece), in which case
    decode() drops one leading space from the first token; clean_spaces, whether decode() applies
    llama.cpp's clean-up (" ," -> ","), which vocabularies like GPT-2 and Llama 3 ask for.
    """

    def __init__(
        self,
        *,
        pieces: Sequence[str],
        piece_bytes: Sequence[bytes],
        hidden: Sequence[bool],
        encode_fn: EncodeFn,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        add_space_prefix: bool,
        clean_spaces: bool,
        kind: str,
    ):
        assert len(pieces) == len(piece_bytes) == len(hidden)
        self._pieces = list(pieces)  # raw vocabulary strings, for display
        self._bytes = list(piece_bytes)  # what each token writes when special tokens are shown
        self._hidden = list(hidden)  # control/unknown: writes nothing unless special=True
        self._encode_fn = encode_fn
        self.vocab_size = len(self._pieces)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = frozenset(int(i) for i in eos_ids if i is not None and 0 <= i < self.vocab_size)
        self.add_bos = bool(add_bos and bos_id is not None)
        self.add_space_prefix = add_space_prefix
        self.clean_spaces = clean_spaces
        self.kind = kind  # e.g. "gguf llama", "gguf gpt2/qwen2", "tokenizer.json", "sentencepiece"

    @classmethod
    def from_gguf_reader(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """The vocabulary in the metadata of an open GGUF file."""
        from .gguf_meta import metadata_from_reader
        from .gguf_vocab import tokenizer_from_metadata

        source = str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF metadata")
        return tokenizer_from_metadata(metadata_from_reader(reader), source)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})")

    def encode(self, text: str, add_bos: bool | None = None, *, special: bool = True) -> list[int]:
        """Token ids of text; add_bos None follows the vocabulary's default.

        special=True (the default, as llama.cpp tokenizes prompts) turns control tokens written in the
        text, such as "<|im_start|>" from a chat template, into their ids; special=False treats them
        as plain text (user-defined tokens are matched either way, as llama.cpp does).
        """
        if not isinstance(text, str):
            raise UsageError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode_fn(text, special)
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise UsageError("this vocabulary has no BOS token; call encode(..., add_bos=False)")
            ids = [self.bos_id, *ids]
        return ids

    def _check(self, token_id: int) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab_size:
            raise UsageError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return i

    def token_to_piece(self, token_id: int) -> str:
        """The token as the vocabulary spells it ('▁Hello', 'Ġworld', '<0x0A>', '<s>'), for display."""
        return self._pieces[self._check(token_id)]

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes this token adds to decoded text: a byte token its byte, '▁' a space, control tokens
        nothing unless special. The first token of a sequence also loses one leading space in decode()
        when add_space_prefix is set (see decode); StreamDecoder does the same."""
        i = self._check(token_id)
        return b"" if self._hidden[i] and not special else self._bytes[i]

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of the ids (invalid UTF-8 becomes U+FFFD), as llama.cpp's detokenize.

        With add_space_prefix, one leading space is dropped from the first token that writes
        anything, so decode(encode(text)) == text even with BOS first (llama.cpp keeps the space
        after a leading BOS; transformers' decode(skip_special_tokens=True) drops it, as here).
        """
        parts = [self.token_bytes(i, special) for i in ids]
        if self.add_space_prefix:  # undo the space encode() put before the text
            k = next((k for k, p in enumerate(parts) if p), None)
            if k is not None and parts[k][:1] == b" ":
                parts[k] = parts[k][1:]
        text = b"".join(parts).decode("utf-8", errors="replace")
        return clean_up_spaces(text) if self.clean_spaces else text
