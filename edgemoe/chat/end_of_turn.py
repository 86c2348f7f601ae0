"""Which token ids end a chat reply: the vocabulary's end-of-generation ids, the usual end-of-turn tokens it
has, and the control token the template writes after an assistant message.

The tokenizer's `eos_ids` already follow llama.cpp (eos/eot/eom ids and its list of end-of-generation
texts); a chat also ends at end-of-turn tokens llama.cpp does not list (OpenChat's "<|end_of_turn|>",
Command-R's "<|END_OF_TURN_TOKEN|>") and at whatever control token a custom template closes a turn with.
These apply to chat requests only: a completion may legitimately write them.
"""

from __future__ import annotations

# Texts of end-of-turn tokens; each counts when the vocabulary has it as one control token.
END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>", "<|call|>", "<|end_of_turn|>",
    "<end_of_turn>", "<|END_OF_TURN_TOKEN|>", "</s>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<|endoftext|>",
    "<|end_of_text|>", "<eos>", "<|eot|>", "<turn|>",
)
# Harmony (gpt-oss): "<|end|>" closes a message inside the reply (the analysis channel before the final
# one); the reply ends at "<|return|>" or "<|call|>". llama.cpp drops "<|end|>" from its set for the same reason.
HARMONY_ENDS = ("<|return|>", "<|call|>")
_PROBE_USER, _PROBE_REPLY = "Hello there", "PROBE-REPLY-7f3a"


def end_of_turn_ids(tokenizer, template=None) -> frozenset[int]:
    """The ids that end a chat reply for `tokenizer`, given `template` (a ChatTemplate, or None)."""
    if tokenizer is None:
        return frozenset()
    ids = set(tokenizer.eos_ids)
    for text in END_OF_TURN_TEXTS:
        i = control_id(tokenizer, text)
        if i is not None:
            ids.add(i)
    if template is not None:
        i = _closing_token(tokenizer, template)
        if i is not None:
            ids.add(i)
    if all(control_id(tokenizer, t) is not None for t in HARMONY_ENDS):
        ids.discard(control_id(tokenizer, "<|end|>"))
    return frozenset(ids)


def control_id(tokenizer, text: str) -> int | None:
    """The id of the control token spelled `text`, None if the vocabulary has no such single control token."""
    try:
        ids = tokenizer.encode(text, add_bos=False, special=True)
    except Exception:  # noqa: BLE001 - a vocabulary that cannot encode this text has no such token
        return None
    if len(ids) != 1 or not _is_control(tokenizer, ids[0]):
        return None
    return ids[0] if tokenizer.token_bytes(ids[0], special=True) == text.encode("utf-8") else None


def _is_control(tokenizer, i: int) -> bool:
    """Control tokens write nothing in decoded text unless special tokens are shown."""
    return tokenizer.token_bytes(i) == b"" and tokenizer.token_bytes(i, special=True) != b""


def _closing_token(tokenizer, template) -> int | None:
    """The control token the template writes right after an assistant message, if any ("<|im_end|>" for
    ChatML, "<|eot_id|>" for Llama 3, "</s>" for Mistral)."""
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
    try:
        text = template.render(messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a template that needs another conversation shape: no probe
        return None
    at = text.rfind(_PROBE_REPLY)
    if at < 0:
        return None
    tail = text[at + len(_PROBE_REPLY):].lstrip()
    if not tail:
        return None
    try:
        ids = tokenizer.encode(tail, add_bos=False, special=True)
    except Exception:  # noqa: BLE001 - the probe is a best effort
        return None
    return ids[0] if ids and _is_control(tokenizer, ids[0]) else None
