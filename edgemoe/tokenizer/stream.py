"""Streaming detokenization: print text as tokens arrive, never half a character."""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Tokenizer

# llama.cpp's detokenize clean-up, three passes over the text (each over the previous one's output):
# 1. " ?", " !", " .", " ,"  -> drop the space;
# 2. " ' "                   -> "'" (both spaces; a space eaten here cannot start the next match);
# 3. " 's", " 'm", " 're", " 've" -> drop the space (" 't", " 'd", " 'll" keep it).
# The passes only remove spaces, all ASCII, so running them on text rather than bytes is the same.
_PASS1 = re.compile(r" ([?!.,])")
_PASS2 = re.compile(r" ' ")
_PASS3 = re.compile(r" '(?=[sm]|re|ve)")
_LOOKAHEAD = 3  # a match starts with a space and reads at most 3 characters past it


def clean_up_spaces(text: str) -> str:
    """llama.cpp's clean_spaces post-processing of detokenized text."""
    text = _PASS1.sub(r"\1", text)
    text = _PASS2.sub("'", text)
    return _PASS3.sub("'", text)


def _safe_cut(text: str) -> int:
    """Largest c with no space in text[c-3:c]: clean_up_spaces(text) == clean(text[:c]) + clean(text[c:]).

    Every clean-up match starts with a space and spans at most 4 characters, and only spaces are ever
    removed, so no match (in any pass) can cross such a cut, and the 3 characters before it survive.
    """
    c = len(text)
    while c > 0:
        r = text.rfind(" ", max(0, c - _LOOKAHEAD), c)
        if r < 0:
            return c
        c = r
    return 0


class StreamDecoder:
    """Decode a token stream piece by piece.

    push(id) returns the text that is final so far: a UTF-8 sequence split across tokens (byte
    fallback, byte-level BPE) is held back until complete, and with clean_spaces a trailing space is
    held until the next characters show whether llama.cpp would drop it. flush() returns the rest,
    an incomplete trailing sequence as U+FFFD. All push() outputs plus flush() equal
    tokenizer.decode(all ids, special).
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._pending = ""  # decoded text held back for the space clean-up

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        b = self._tok.token_bytes(token_id, self._special)
        if self._first and b:  # the first token that writes anything loses encode()'s space prefix
            self._first = False
            if self._tok.add_space_prefix and b[:1] == b" ":
                b = b[1:]
        text = self._utf8.decode(b)
        if not self._tok.clean_spaces:
            return text
        self._pending += text
        c = _safe_cut(self._pending)
        out, self._pending = self._pending[:c], self._pending[c:]
        return clean_up_spaces(out)

    def flush(self) -> str:
        """End of stream: the held-back rest, an incomplete UTF-8 tail as U+FFFD. The decoder is then
        ready for a new sequence (whose first token again loses the space prefix)."""
        text = self._pending + self._utf8.decode(b"", final=True)
        self._pending = ""
        self._utf8.reset()
        self._first = True
        return clean_up_spaces(text) if self._tok.clean_spaces else text
