"""Shared test fixtures: where the real tokenizer vocabularies are."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def shared_vocab_dir() -> pathlib.Path | None:
    """`$EDGEMOE_VOCAB_DIR`, else `<repo>/../shared/vocab`; None when neither exists."""
    for cand in (os.environ.get("EDGEMOE_VOCAB_DIR"), REPO.parent / "shared" / "vocab"):
        if cand and pathlib.Path(cand, "ggml-vocab-llama-spm.gguf").exists():
            return pathlib.Path(cand)
    return None


RAY_FILES = ("test_cluster.py", "test_cluster_bridge.py", "test_cluster_models.py")  # one local Ray at a time


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's `--dist loadgroup` (the README's test command) each file's tests stay in one worker, so
    a module's fixtures are built once, and the files that start a local Ray instance share one worker."""
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the default model (synthesised on first use) out of the user's real cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


@pytest.fixture(scope="module")
def model_gguf(tmp_path_factory) -> str:
    """Path of a tiny Mixtral GGUF with a real (word-level SentencePiece-style) vocabulary."""
    from mixtral_factory import tiny_gguf_with_vocab

    return tiny_gguf_with_vocab(tmp_path_factory.mktemp("tiny"))[0]


@pytest.fixture(params=("generic", "avx2", "vnni"))
def variant(request):
    """Every matrix kernel runs with this SIMD variant (skipped where the CPU cannot run it)."""
    from edgemoe.kernels import dispatch

    if request.param not in dispatch.supported_variants():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    dispatch.force_variant(request.param)
    yield request.param
    dispatch.force_variant(None)
