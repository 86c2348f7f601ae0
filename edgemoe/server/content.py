"""A chat message's `content` as the text the prompt carries: a string, or OpenAI's list of content parts.

Text parts ({"type": "text", "text"}) and an assistant's refusal parts are concatenated in order; image, audio
and file parts are refused with a 400 naming the part (the model reads text only).
"""

from __future__ import annotations

from typing import Any

from .checks import RequestError, check, show

_NOT_TEXT = {  # part type → what it carries, for the error message
    "image_url": "image", "input_image": "image", "image": "image",
    "input_audio": "audio", "audio": "audio",
    "file": "file", "input_file": "file",
}
_PART_TEXT = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal"}  # type → its key


def message_text(content: Any, name: str, role: str) -> str:
    """The text of `content` (`name` is its field, "messages[2].content", for errors). An assistant message
    that called tools may have null content: that is "" here (its calls are server/tools.py's)."""
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    check(isinstance(content, list), name, "a string or a list of content parts", content)
    texts = []
    for j, part in enumerate(content):
        where = f"{name}[{j}]"
        check(isinstance(part, dict) and isinstance(part.get("type"), str), where,
               'a content part such as {"type": "text", "text": "..."}', part)
        kind = part["type"]
        if kind in _NOT_TEXT:
            raise RequestError(f"{_NOT_TEXT[kind]} input is not supported: this model reads text only; send "
                               f"'{where}' as a text part", where)
        key = _PART_TEXT.get(kind)
        if key is None:
            raise RequestError(f"unknown content part type {show(kind)}; send {{\"type\": \"text\", \"text\": "
                               "\"...\"} parts", f"{where}.type")
        check(isinstance(part.get(key), str), f"{where}.{key}", "a string", part.get(key))
        texts.append(part[key])
    return "".join(texts)
