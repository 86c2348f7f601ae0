"""Reading configuration YAML defensively: a file someone else wrote must fail fast, on one line.

    data = load_file("edgemoe.yaml")     # raises Unreadable("line 3, column 5: ...")

What a settings file never needs is refused instead of being expanded: anchors and aliases (a
"billion laughs" file expands to gigabytes), merge keys, duplicate keys (YAML would keep the last
silently), nesting deeper than MAX_DEPTH, more than MAX_NODES values, files over MAX_BYTES, and text
that is not UTF-8.
libyaml's parser (C) is used when PyYAML was built with it; composing stays in Python so the checks
see every node before it is built.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode
from yaml.resolver import Resolver

from .config_schema import clip

MAX_BYTES = 1 << 20  # a settings file is a few KB; this bounds reading, parsing and every message
MAX_DEPTH = 32  # the schema nests 4 deep (cache.tiers[0].name); 32 leaves room for values like lists of lists
MAX_NODES = 10_000  # a full configuration has ~150 values; composing in Python costs ~8 µs each
MERGE_TAG = "tag:yaml.org,2002:merge"
# What PyYAML's constructors raise, unmarked, on explicit tags that do not fit: !!bool x, !!int "", !!timestamp x
_CONSTRUCTOR_SLIPS = (ValueError, OverflowError, IndexError, KeyError, TypeError, AttributeError)


class Unreadable(Exception):
    """The text cannot be read as configuration; `str(e)` is one line saying where, what and the fix."""


class Refused(yaml.MarkedYAMLError):
    """Valid YAML this loader will not read (aliases, merge keys, duplicate keys, deep nesting)."""

    def __init__(self, problem: str, mark):
        super().__init__(problem=problem, problem_mark=mark)


class _Checks(Composer):
    """Composer and constructor overrides shared by the C and the pure-Python loader."""

    def __init__(self):
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self.check_event(AliasEvent):
            raise Refused(f"YAML aliases are not allowed (*{clip(event.anchor, 40)}); write the value out", event.start_mark)
        if event.anchor is not None:
            raise Refused(f"YAML anchors are not allowed (&{clip(event.anchor, 40)}); write the value out "
                          "where it is used", event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise Refused(f"nested more than {MAX_DEPTH} levels deep; settings nest 4 levels at most", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise Refused(f"more than {MAX_NODES} values; a configuration holds a few hundred (is this the right "
                          "file?)", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except _CONSTRUCTOR_SLIPS as e:  # also int("9" * 5000) and 2024-13-45: give them the node's place
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise Refused(f"cannot read this value as {clip(tag, 40)} ({clip(str(e), 80)})", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value if isinstance(node, MappingNode) else ():  # else: SafeConstructor says so
            if key_node.tag == MERGE_TAG:
                raise Refused("YAML merge keys (<<) are not allowed; write the keys out", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # unhashable: SafeConstructor reports it below
                continue
            if first is not key_node.start_mark:
                raise Refused(f"duplicate key {clip(str(key), 60)!r} (first at line {first.line + 1}); keep one",
                              key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class PyConfigLoader(_Checks, yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, SafeConstructor, Resolver):
    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _Checks.__init__(self)


if getattr(yaml, "__with_libyaml__", False):
    from yaml.cyaml import CParser

    class CConfigLoader(_Checks, CParser, SafeConstructor, Resolver):
        def __init__(self, stream):
            CParser.__init__(self, stream)
            _Checks.__init__(self)

    ConfigLoader: type = CConfigLoader
else:
    ConfigLoader = PyConfigLoader


def load_text(text: str, loader: type = ConfigLoader) -> Any:
    """The value of one YAML document; raises Unreadable (one line) for anything wrong or refused."""
    if len(text) > MAX_BYTES:
        raise Unreadable(f"{len(text)} characters, more than the {MAX_BYTES} allowed; a configuration is a few KB")
    ld = None
    try:
        ld = loader(text)  # the pure-Python reader checks for control characters here
        return ld.get_single_data()
    except yaml.YAMLError as e:
        raise Unreadable(explain(e, text)) from None
    except _CONSTRUCTOR_SLIPS as e:  # one escaping construct_object (a generator's second half): still one line
        raise Unreadable(f"not valid YAML ({clip(f'{type(e).__name__}: {e}', 120)})") from None
    finally:
        if ld is not None:
            ld.dispose()


def load_file(path: str) -> Any:
    """The YAML in `path` (None for an empty file); OSError for a file that cannot be opened."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)  # also bounds /dev/zero, a FIFO or a log file passed by mistake
    if len(data) > MAX_BYTES:
        raise Unreadable(f"larger than {MAX_BYTES // 1024} KB; a configuration is a few KB (is this the right file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Unreadable(f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save the file as UTF-8") from None
    return load_text(text)


def explain(e: yaml.YAMLError, text: str = "") -> str:
    """One line for a YAML error: 'line L, column C: what'."""
    if isinstance(e, yaml.reader.ReaderError) and isinstance(e.character, int):
        at = text.find(chr(e.character))  # the first one; libyaml's position counts bytes, not characters
        where = f"line {text.count(chr(10), 0, at) + 1}: " if at >= 0 else ""
        return f"{where}not valid YAML (character #x{e.character:04x}: {e.reason}); remove it"
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    if isinstance(e, Refused):
        return where + e.problem
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    what = f"{context}, {problem}" if context else problem
    return f"{where}not valid YAML ({clip(what, 160)})"

