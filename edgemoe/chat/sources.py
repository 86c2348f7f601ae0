"""Where a model's chat template comes from: --chat-template FILE, else the model's own, else the plain format.

The model's own: a GGUF file's `tokenizer.chat_template` (and named ones, `tokenizer.chat_template.NAME`,
such as "tool_use"); a Hugging Face directory's `chat_template.jinja` (+ `additional_chat_templates/*.jinja`),
which take priority over `tokenizer_config.json`'s `chat_template` (a string, or a list of
{"name", "template"}), as transformers loads them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ..errors import EdgeMoEError, ModelFormatError, UsageError
from .end_of_turn import end_of_turn_ids
from .template import ChatTemplate, compile_template

log = logging.getLogger("edgemoe.chat")

GGUF_KEY = "tokenizer.chat_template"
MAX_TEMPLATE_BYTES = 1 << 20  # the largest real templates are ~20 KB


def load_chat_template(model_path: str, tokenizer, *, override: str | None = None,
                       metadata: Mapping[str, Any] | None = None) -> ChatTemplate:
    """The ChatTemplate a session uses, its stop ids set for `tokenizer`.

    override: --chat-template FILE (a template that does not compile is a UsageError here: exit 2).
    metadata: the GGUF's scalar metadata when the loader has it (else the file's metadata is read again).
    A model's own template that does not compile is logged and fails each chat request with the reason (400),
    so the commands that never chat still run.
    """
    bos = _special_text(tokenizer, getattr(tokenizer, "bos_id", None))
    eos = _special_text(tokenizer, getattr(tokenizer, "eos_id", None))
    if override is not None:
        label = f"the chat template {os.path.basename(override)} (--chat-template)"
        template = ChatTemplate({"default": read_template_file(override)}, origin="file", label=label,
                                bos_token=bos, eos_token=eos, tokenizer=tokenizer)
    else:
        found = model_templates(model_path, metadata)
        if not found:
            template = ChatTemplate.plain(tokenizer)
        else:
            label = "the model's chat template"
            try:
                template = ChatTemplate(found, origin="model", label=label, bos_token=bos, eos_token=eos,
                                        tokenizer=tokenizer)
            except UsageError as e:
                log.warning("%s: %s; chat requests will fail until --chat-template FILE gives a working one",
                            model_path, e)
                template = ChatTemplate(found, origin="model", label=label, bos_token=bos, eos_token=eos,
                                        tokenizer=tokenizer, broken=f"{e}"[:400])
    template.stop_ids = end_of_turn_ids(tokenizer, template if template.broken is None else None)
    return template


def check_template_file(path: str) -> None:
    """Read and compile a --chat-template file (UsageError naming the line if it does not compile)."""
    compile_template(read_template_file(path), f"--chat-template {path}")


def read_template_file(path: str) -> str:
    """The Jinja text of a --chat-template file."""
    try:
        size = os.path.getsize(path)
        if size > MAX_TEMPLATE_BYTES:
            raise UsageError(f"--chat-template {path} is {size} bytes; a chat template is a few KB of Jinja text")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"--chat-template {path}: no such file; pass a Jinja chat template file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--chat-template {path}: cannot read it ({e}); pass a UTF-8 Jinja text file") from None


def model_templates(model_path: str, metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """name → Jinja source of the templates a model carries ({} when none)."""
    if os.path.isdir(model_path):
        return hf_templates(model_path)
    if metadata is None:
        from ..tokenizer.gguf_meta import read_gguf_metadata

        metadata = read_gguf_metadata(model_path)
    return gguf_templates(metadata, model_path)


def gguf_templates(metadata: Mapping[str, Any], where: str = "GGUF file") -> dict[str, str]:
    """`tokenizer.chat_template` as "default", `tokenizer.chat_template.NAME` as NAME."""
    out = {}
    for key, value in metadata.items():
        if key == GGUF_KEY:
            name = "default"
        elif key.startswith(GGUF_KEY + "."):
            name = key[len(GGUF_KEY) + 1:]
        else:
            continue
        if not isinstance(value, str):
            raise ModelFormatError(f"{where}: {key} is not a string; the file is corrupt (or pass --chat-template "
                                   "FILE)")
        out[name] = value
    return out


def hf_templates(directory: str) -> dict[str, str]:
    """A Hugging Face directory's templates, by transformers' priority."""
    out = {}
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja):
        out["default"] = _read_text(jinja)
    extra = os.path.join(directory, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja"):
                out[name.removesuffix(".jinja")] = _read_text(os.path.join(extra, name))
    if out:
        return out
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(cfg_path):
        return {}
    try:
        with open(cfg_path, encoding="utf-8") as f:
            value = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelFormatError(f"cannot read {cfg_path}: {e}") from None
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) and
                                       isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ModelFormatError(f"{cfg_path}: chat_template must be a string or a list of {{name, template}} objects; "
                           "fix it or pass --chat-template FILE")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None


def _special_text(tokenizer, token_id: int | None) -> str:
    """A special token as templates write it (llama.cpp's token_to_piece with special=True); "" if none."""
    if tokenizer is None or token_id is None:
        return ""
    try:
        return tokenizer.token_bytes(token_id, special=True).decode("utf-8", errors="replace")
    except EdgeMoEError:
        return ""
