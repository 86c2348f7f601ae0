"""Parsed YAML → frozen dataclasses, collecting every problem with its key path instead of stopping at the first.

A schema is a tree of frozen dataclasses whose fields are declared with `setting(default, rule)` (a leaf),
`section(Cls)` (a nested mapping) or `entries(Cls, default)` (a list of mappings). A `Rule` is a predicate
plus the phrase describing what it accepts, so every message reads `path: expected <what>, got <value>`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Callable
from typing import Any

_MISSING = dataclasses.MISSING


class Rule:
    """Accepts a value when `test(value)` holds; `convert` turns it into the stored form."""

    none_word = "null"

    def __init__(self, what: str, test: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v,
                 shown: Callable[[Any], str] | None = None):
        self.what = what
        self.test = test
        self.convert = convert
        self.shown = shown  # how a refused value is echoed (default: show)

    def show(self, value: Any) -> str:
        return self.shown(value) if self.shown else show(value)

    def check(self, value: Any) -> tuple[bool, Any]:
        try:
            ok = bool(self.test(value))
        except (TypeError, ValueError):
            ok = False
        return (True, self.convert(value)) if ok else (False, None)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(what: str, lo: int | None = None, hi: int | None = None) -> Rule:
    return Rule(what, lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def number(what: str, test: Callable[[float], bool] = lambda v: True) -> Rule:
    return Rule(what, lambda v: is_number(v) and test(v), float)


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def choice(*options: str, aliases: dict[str, str] | None = None) -> Rule:
    aliases = aliases or {}
    return Rule("one of " + ", ".join(options), lambda v: isinstance(v, str) and (v in options or v in aliases),
                lambda v: aliases.get(v, v))


def text(what: str = "a non-empty string") -> Rule:
    return Rule(what, lambda v: isinstance(v, str) and v.strip() != "")


def file_path(what: str) -> Rule:
    """A non-empty path; a NUL byte would only fail later, inside open() or bind()."""
    return Rule(what, lambda v: isinstance(v, str) and v.strip() != "" and "\0" not in v)


def optional(rule: Rule, none_word: str = "auto") -> Rule:
    """`rule`, or null / `none_word` (stored as None, written back as `none_word`)."""
    out = Rule(f"{rule.what}, or {none_word}", lambda v: v is None or v == none_word or rule.test(v),
               lambda v: None if v is None or v == none_word else rule.convert(v), rule.shown)
    out.none_word = none_word
    return out


def setting(default: Any, rule: Rule, doc: str = "", dump: Callable[[Any], Any] | None = None) -> Any:
    """A leaf field: `default`, validated by `rule` when given; `dump` writes it back as YAML would hold it."""
    return dataclasses.field(default=default, metadata={"rule": rule, "doc": doc, "dump": dump})


def required(rule: Rule, doc: str = "") -> Any:
    """A leaf field of a list entry that must be written (no default)."""
    return dataclasses.field(metadata={"rule": rule, "doc": doc, "required": True})


def section(cls: type, doc: str = "") -> Any:
    """A nested mapping of settings, built from `cls` (all its keys default)."""
    return dataclasses.field(default_factory=cls, metadata={"section": cls, "doc": doc})


def entries(cls: type, default: tuple, doc: str = "") -> Any:
    """A list of mappings, each built from `cls`; the whole list replaces the default."""
    return dataclasses.field(default=default, metadata={"entries": cls, "doc": doc})


SHOWN_CHARS = 80  # a value echoed in a message is cut here: a 2 GB value must not become a 2 GB error line


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` on one line (control characters escaped) and at most `limit` characters, ending in … when cut."""
    head = text[: limit + 1]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in head)
    return head if len(text) <= limit and len(head) <= limit else head[: limit - 1] + "…"


def show(v: Any) -> str:
    """A value as the user wrote it, YAML-ish: "lots", 0, true, null, [1, 2]; clipped to SHOWN_CHARS."""
    try:
        text = json.dumps(v, default=str)
    except ValueError:  # NaN, inf; an int past Python's 4300-digit str() limit
        try:
            text = str(v)
        except ValueError:
            text = f"a {type(v).__name__} too large to show"
    return clip(text)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Problems:
    """Every problem found, as `path: message` lines, in the order found."""

    def __init__(self):
        self.lines: list[str] = []
        self.paths: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.lines.append(f"{path or '(top level)'}: {message}")
        self.paths.append(path)

    def near(self, *paths: str) -> bool:
        """Whether a problem was already found at or under one of `paths` (cross-checks then stay quiet)."""
        return any(p == q or p.startswith(q + ".") or p.startswith(q + "[") for p in self.paths for q in paths)

    def __bool__(self) -> bool:
        return bool(self.lines)


def build(cls: type, raw: Any, path: str, problems: Problems) -> Any:
    """An instance of dataclass `cls` from the mapping `raw`; problems are recorded, defaults stand in."""
    if raw is None:  # a section written as `ssd:` with nothing under it
        raw = {}
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping of settings, got {show(raw)}")
        raw = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            name = clip(str(key), 60)
            near = difflib.get_close_matches(name, list(fields), n=1)
            hint = f" (did you mean {near[0]}?)" if near else f"; known keys: {', '.join(fields)}"
            problems.add(join(path, name), "unknown key" + hint)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        meta, p = f.metadata, join(path, name)
        if name not in raw:
            if meta.get("required"):
                problems.add(p, f"missing; expected {meta['rule'].what}")
                kwargs[name] = None
            continue
        value = raw[name]
        if "section" in meta:
            kwargs[name] = build(meta["section"], value, p, problems)
        elif "entries" in meta:
            kwargs[name] = _build_entries(meta["entries"], value, p, problems, f.default)
        else:
            ok, converted = meta["rule"].check(value)
            if ok:
                kwargs[name] = converted
            else:
                problems.add(p, f"expected {meta['rule'].what}, got {meta['rule'].show(value)}")
                if meta.get("required"):
                    kwargs[name] = None
    return cls(**kwargs)


def _build_entries(cls: type, raw: Any, path: str, problems: Problems, default: tuple) -> tuple:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add(path, f"expected a list of mappings, got {show(raw)}")
        return default
    return tuple(build(cls, item, join(path, i), problems) for i, item in enumerate(raw))


def to_plain(obj: Any) -> Any:
    """A dataclass tree → dicts, lists and scalars (what yaml.safe_dump and json accept)."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            dump = f.metadata.get("dump")
            none_word = getattr(f.metadata.get("rule"), "none_word", "null")
            if value is None:
                out[f.name] = None if none_word == "null" else none_word
            else:
                out[f.name] = dump(value) if dump else to_plain(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def parse_key(key: str) -> list[str | int]:
    """"cache.tiers[1].capacity" or "cache.tiers.1.capacity" → ["cache", "tiers", 1, "capacity"]."""
    out: list[str | int] = []
    for part in key.replace("[", ".").replace("]", "").split("."):
        if part == "":
            raise ValueError(f"malformed key {key!r}")
        out.append(int(part) if part.isdigit() else part)
    if not out or isinstance(out[0], int):
        raise ValueError(f"malformed key {key!r}")
    return out


def key_path(segments: list[str | int]) -> str:
    path = ""
    for s in segments:
        path = join(path, s)
    return path
