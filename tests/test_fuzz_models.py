"""Fuzzing the loader with structure-aware mutants (tests/model_fuzz.py), bounded for CI: every mutant is
refused with one typed error, or fails its request cleanly, or runs — and runs with the unmutated model's
tokens unless the mutation makes another valid model. 0 crashes, 0 hangs, 0 tracebacks.

`python tools/fuzz_models.py --minutes N` runs the same for longer with fresh random seeds.
"""

from __future__ import annotations

import os
import signal

import pytest
from gguf_image import GGUFImage
from hypothesis import HealthCheck, given, settings
from model_fuzz import apply_gguf, apply_hf, gguf_ops, hf_ops, judge, outcome

from edgemoe.default_model import draft_model_path

HANG_S = 60  # one mutant: load + 3 tokens; a first compile of a new expert count takes ~20 s on a slow core
FUZZ = settings(max_examples=int(os.environ.get("EDGEMOE_FUZZ_EXAMPLES", "60")), deadline=None, database=None,
                derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True)


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a mutant took more than {HANG_S} s")


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-gguf")
    path = str(d / "base.gguf")
    GGUFImage.read(draft_model_path()).write(path)
    kind, tokens = outcome(path)
    assert kind == "ran"
    return path, tokens, d


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    from mixtral_factory import make_hf_mixtral

    d = tmp_path_factory.mktemp("fuzz-hf")
    hf, _, _ = make_hf_mixtral(vocab=300, hidden=64, layers=2)
    hf.save_pretrained(d / "base")
    kind, tokens = outcome(str(d / "base"))
    assert kind == "ran"
    return str(d / "base"), tokens, d


def _bounded(fn):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_fuzz_gguf_mutants(gguf_base):
    base, tokens, d = gguf_base
    image = GGUFImage.read(base)
    seen = {}

    @FUZZ
    @given(ops=gguf_ops(image))
    def one(ops):
        m = apply_gguf(base, ops, str(d / "mutant.gguf"))
        kind = _bounded(lambda: judge(m, tokens))
        seen[kind] = seen.get(kind, 0) + 1

    one()
    print("GGUF mutants:", seen)
    assert seen.get("refused", 0) > 0


def test_fuzz_hf_mutants(hf_base):
    base, tokens, d = hf_base
    seen = {}

    @FUZZ
    @given(ops=hf_ops())
    def one(ops):
        m = apply_hf(base, ops, str(d / "mutant"))
        kind = _bounded(lambda: judge(m, tokens))
        seen[kind] = seen.get(kind, 0) + 1

    one()
    print("HF mutants:", seen)
    assert seen.get("refused", 0) > 0
