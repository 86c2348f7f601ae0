"""What bytes each token contributes to output text, per vocabulary style (llama.cpp token_to_piece)."""

from __future__ import annotations

import re

# GGUF tokenizer.ggml.token_type values (llama.cpp LLAMA_TOKEN_TYPE_*).
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)

SPM_SPACE = "\u2581"  # '▁', SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (as in openai/gpt-2 encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_DECODER: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


def byte_piece_value(piece: str) -> int | None:
    """The byte of a SentencePiece byte-fallback piece '<0xAB>', else None."""
    m = _BYTE_PIECE.fullmatch(piece)
    return int(m.group(1), 16) if m else None


def byte_level_bytes(piece: str) -> bytes:
    """Undo GPT-2's byte-to-unicode spelling; a character outside that alphabet stands for itself."""
    out = bytearray()
    for c in piece:
        b = BYTE_DECODER.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def spm_bytes(piece: str) -> bytes:
    """A SentencePiece piece as text: '▁' is a space; '<0xAB>' is that byte."""
    b = byte_piece_value(piece)
    if b is not None:
        return bytes([b])
    return piece.replace(SPM_SPACE, " ").encode("utf-8")


def gguf_token_bytes(piece: str, token_type: int, byte_level: bool) -> bytes:
    """Bytes of one GGUF token as llama.cpp's token_to_piece(special=True) writes them.

    Control/unknown tokens are spelled out here; the Tokenizer hides them unless asked. User-defined
    tokens are copied verbatim (llama.cpp does not unescape them); unused/undefined ones are empty.
    """
    if token_type in (CONTROL, UNKNOWN, USER_DEFINED):
        return piece.encode("utf-8")
    if token_type == BYTE:
        b = byte_piece_value(piece)
        return bytes([b]) if b is not None else b""
    if token_type == NORMAL:
        return byte_level_bytes(piece) if byte_level else piece.replace(SPM_SPACE, " ").encode("utf-8")
    return b""
