"""What logprobs call a token: its text, its UTF-8 bytes and where it starts in the reply, as OpenAI reports them.

A token's text is the bytes it adds to the decoded text (a byte-fallback piece "<0x0A>" is "\\n", "▁of" is
" of"), not the vocabulary's spelling. A token whose bytes are not whole UTF-8 characters (one byte of "é")
has them escaped, as OpenAI does: "\\xc3" in chat (its `bytes` field holds the bytes themselves), "bytes:\\xc3"
in completions. `text_offset` is the character offset in the reply's text (after an echoed prompt) where the
token's text starts; a character split over tokens starts at the first of them.

The texts of a reply's tokens join to its text except where the vocabulary's clean-up removes spaces
(GPT-2-style " ," → ","; llama.cpp's detokenizer does it, OpenAI's tokens do not) and where a stop string cut it.
"""

from __future__ import annotations

import codecs


def escaped_text(b: bytes, legacy: bool) -> str:
    """The text of a token's bytes: itself when whole UTF-8, else escaped (legacy = the completions API)."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        text = b.decode("utf-8", "backslashreplace")
        return "bytes:" + text if legacy else text


class TokenTexts:
    """The bytes and text offsets of one reply's tokens, fed in order (`push`). Mirrors StreamDecoder: the
    first token that writes anything loses the space encode() put before the text (add_space_prefix)."""

    def __init__(self, tokenizer, offset: int = 0):
        self._tok = tokenizer  # None: a model without a vocabulary; its tokens are their ids
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = offset  # characters of the reply's text so far

    def bytes_of(self, token_id: int) -> bytes | None:
        """The bytes `token_id` would add at the current position (None without a vocabulary)."""
        if self._tok is None:
            return None
        b = self._tok.token_bytes(token_id)
        if self._first and b and self._tok.add_space_prefix and b[:1] == b" ":
            b = b[1:]
        return b

    def text_of(self, token_id: int, legacy: bool) -> str:
        b = self.bytes_of(token_id)
        return str(token_id) if b is None else escaped_text(b, legacy)

    def push(self, token_id: int) -> tuple[bytes | None, int]:
        """The chosen token's bytes and text offset; moves past it."""
        b = self.bytes_of(token_id)
        at = self.offset
        if b:
            self._first = False
            self.offset += len(self._utf8.decode(b))
        return b, at
