"""The files a model's weights are memory-mapped from: checked once when an engine starts on them, then
before every step.

Numba kernels read the mappings directly, so a file truncated under a running process kills it with
SIGBUS, which Python cannot catch. One `os.stat` per file before each step (a few microseconds) finds a
file that shrank below what is mapped, or was replaced or removed, and the engine then fails requests
with that message instead of touching the mapping. The race that remains (a truncation during a step)
still kills the process, but faulthandler prints why first.

    files = ModelFiles.of(model, gate)   # every np.memmap the weights (and a draft model's) point into
    error = files.check()                # None, or ModelFileChanged("model file X changed on disk
                                         # (size A → B); restart the service")
"""

from __future__ import annotations

import faulthandler
import logging
import mmap
import os
import types
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError

log = logging.getLogger("edgemoe.engine")

_LEAVES = (str, bytes, int, float, complex, bool, type(None), np.generic, type)
# Mapped packs verified (or found to be no pack) in this process, by file identity: an engine core is built
# per `generate()` call, and a pack's checksums cost one read of its experts.
_checked: set[tuple] = set()


class ModelFileChanged(ModelFormatError):
    """A memory-mapped model file shrank, was replaced or removed while the process runs."""


@dataclass
class _File:
    path: str
    needed: int  # bytes the mappings cover: the file must stay at least this large
    size: int  # st_size when watching began
    dev: int
    ino: int

    def changed(self) -> str | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return f"model file {self.path} changed on disk (removed); restart the service"
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return f"model file {self.path} changed on disk (replaced by another file); restart the service"
        if st.st_size < self.needed:
            return f"model file {self.path} changed on disk (size {self.size} → {st.st_size}); restart the service"
        return None


class ModelFiles:
    """The memory-mapped files behind an engine's models; `error` is set, for good, by the first change."""

    def __init__(self, files: dict[str, int]):
        self.files: list[_File] = []
        self.error: ModelFileChanged | None = None
        for path, needed in sorted(files.items()):
            try:
                st = os.stat(path)
            except OSError:  # already gone: the mapping keeps the old file alive, and nothing can shrink it
                continue
            self.files.append(_File(path, needed, st.st_size, st.st_dev, st.st_ino))
        if self.files and not faulthandler.is_enabled():
            faulthandler.enable()  # a SIGBUS in the remaining race prints "Fatal Python error: Bus error" first
        self.check()

    @classmethod
    def of(cls, model, gate=None, *, verify_packs: bool = True) -> ModelFiles:
        """The files `model` (and the draft models of `gate`'s proposers) are mapped from. With `verify_packs`,
        each pack among them is checked first (`verify_mapped_packs`)."""
        from ..experts.streaming import StreamingExperts

        models = [model] + [p.model for p in getattr(gate, "proposers", ()) if getattr(p, "model", None) is not None]
        if verify_packs:
            verify_mapped_packs(models)
        files: dict[str, int] = {}
        for m in models:
            for path, needed in mapped_files(m, skip=(StreamingExperts,)).items():  # a stream reads with pread
                files[path] = max(files.get(path, 0), needed)
        return cls(files)

    def check(self) -> ModelFileChanged | None:
        """None while every file still backs its mappings; else why not (and from then on, always that)."""
        if self.error is None:
            for f in self.files:
                problem = f.changed()
                if problem is not None:
                    log.error("%s; failing every request until then (touching the mapping would crash the process)",
                              problem)
                    self.error = ModelFileChanged(problem)
                    break
        return self.error


def mapped_files(*roots, skip: tuple[type, ...] = ()) -> dict[str, int]:
    """Path → bytes of the file its mappings cover, for every np.memmap that `roots` reach through edgemoe
    objects, containers and closures (the weights, an expert store, the embedding lookup's closure);
    instances of `skip` are not looked into."""
    found: dict[str, int] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            _note_mapping(obj, found)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, types.FunctionType):
            stack.extend(_cell_contents(obj))
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif type(obj).__module__.startswith("edgemoe."):
            stack.extend(getattr(obj, "__dict__", {}).values())
            stack.extend(getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s))
    return found


def _cell_contents(fn: types.FunctionType) -> list:
    out = []
    for cell in fn.__closure__ or ():
        try:
            out.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return out


def _note_mapping(a: np.ndarray, found: dict[str, int]) -> None:
    m = a
    while m is not None and not isinstance(m, np.memmap):
        m = m.base if isinstance(m, np.ndarray) else None
    if m is None or getattr(m, "filename", None) is None or getattr(m, "_mmap", None) is None:
        return
    try:
        length = len(m._mmap)
    except ValueError:  # closed
        return
    start = m.offset - m.offset % mmap.ALLOCATIONGRANULARITY  # np.memmap maps from the granule below its offset
    found[m.filename] = max(found.get(m.filename, 0), start + length)


def _identity(path: str) -> tuple | None:
    """The file and its pack manifest as they are now: a change to either is checked again."""
    from ..pack.manifest import manifest_path

    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        ms = os.stat(manifest_path(path))
        manifest = (ms.st_ino, ms.st_size, ms.st_mtime_ns)
    except OSError:
        manifest = None
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, manifest)


def verify_mapped_packs(models) -> None:
    """A pack whose experts are memory-mapped is checked against its manifest (once per process; ModelFormatError:
    a corrupt pack is never served). A pack streamed from disk has each expert checked as it is read instead."""
    from ..experts.streaming import StreamingExperts
    from ..pack.manifest import check_pack

    for m in models:
        if isinstance(getattr(m, "experts", None), StreamingExperts):
            continue
        for path in mapped_files(m, skip=(StreamingExperts,)):
            identity = _identity(path)
            if identity is not None and identity not in _checked:
                check_pack(path, checksums=True)
                _checked.add(identity)
