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


def _fuzz(what: str, ops, mutate, check, fuzz: settings = FUZZ) -> None:
    """For each of `fuzz`'s examples of `ops`: `check(mutate(ops))` under the hang alarm, its outcome counted;
    prints the counts and requires at least one mutant refused."""
    seen = {}

    @fuzz
    @given(ops=ops)
    def one(ops):
        m = mutate(ops)
        kind = _bounded(lambda: check(m))
        seen[kind] = seen.get(kind, 0) + 1

    one()
    print(f"{what} mutants:", seen)
    assert seen.get("refused", 0) > 0


def test_fuzz_gguf_mutants(gguf_base):
    base, tokens, d = gguf_base
    _fuzz("GGUF", gguf_ops(GGUFImage.read(base)), lambda ops: apply_gguf(base, ops, str(d / "mutant.gguf")),
          lambda m: judge(m, tokens))


def test_fuzz_hf_mutants(hf_base):
    base, tokens, d = hf_base
    _fuzz("HF", hf_ops(), lambda ops: apply_hf(base, ops, str(d / "mutant")), lambda m: judge(m, tokens))


@pytest.fixture(scope="module")
def pack_base(tmp_path_factory):
    import importlib.util
    import shutil
    import sys

    from edgemoe.pack.manifest import manifest_path

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("synth_model", os.path.join(here, "..", "tools", "synth_model.py"))
    synth = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = synth
    spec.loader.exec_module(synth)
    d = tmp_path_factory.mktemp("fuzz-pack")
    path = str(d / "tiny.pack.gguf")
    synth.synthesize(path, synth.scaled(synth.PRESETS["tiny"], 0.5), name="tiny", packed=True, progress=False)
    original = str(d / "manifest.orig.json")
    shutil.copy(manifest_path(path), original)
    kind, tokens = outcome(path)
    assert kind == "ran"
    return path, original, manifest_path(path), tokens


@pytest.mark.parametrize("streamed", [False, True], ids=["mapped", "streamed"])
def test_fuzz_pack_manifests(pack_base, streamed):
    """A mutated manifest: refused with one line (or, streamed, a request failing cleanly on a checksum),
    or the run's tokens are the pack's own."""
    from model_fuzz import apply_manifest, manifest_ops

    from edgemoe.experts.setup import StreamOptions

    path, original, live, tokens = pack_base
    stream = StreamOptions.from_budget(1.0) if streamed else None
    try:
        _fuzz("manifest", manifest_ops(), lambda ops: apply_manifest(path, original, ops, live),
              lambda m: judge(m, tokens, stream), settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 2)))
    finally:
        import shutil

        shutil.copy(original, live)
