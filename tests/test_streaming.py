"""Experts streamed from disk give exactly the logits of the memory-mapped model, whatever the cache holds."""

from __future__ import annotations

import numpy as np
import pytest
from mixtral_factory import make_hf_mixtral, mixtral_gguf

from edgemoe.experts.setup import StreamOptions
from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.loader import load_model

PROMPT = [1, 17, 43, 99, 120, 7, 64, 3, 88, 250, 12]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return mixtral_gguf(tmp_path_factory.mktemp("stream") / "m.gguf", hidden=256, intermediate=512, layers=3,
                        heads=4, kv_heads=2, experts=8, top_k=2, vocab=256, seed=5)


def run(loaded, n=12):
    """Prefill logits, then greedy decode logits: (len(PROMPT) + n, V)."""
    m = loaded.model
    cache = m.new_cache(64)
    out = [m.forward(np.asarray(PROMPT), cache, all_logits=True)]
    for _ in range(n):
        out.append(m.forward(np.asarray([int(np.argmax(out[-1][-1]))]), cache))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def reference(model_file):
    return run(load_model(model_file))


@pytest.fixture(scope="module")
def pack_file(model_file, tmp_path_factory):
    from edgemoe.partition import partition

    out = tmp_path_factory.mktemp("pack") / "m.pack.gguf"
    partition(model_file, str(out))
    return str(out)


@pytest.mark.parametrize("verify", [False, True], ids=["plain", "checksums"])
def test_pack_streams_bit_identical(pack_file, reference, verify):
    loaded = load_model(pack_file, StreamOptions.from_budget(1.5 * expert_mb(pack_file), verify_checksums=verify))
    assert all(len(e.ranges) == 1 for layer in loaded.model.experts.extents for e in layer)  # one read per expert
    got = run(loaded)
    loaded.model.experts.close()
    assert np.array_equal(got, reference)


def expert_mb(path):
    loaded = load_model(path, StreamOptions.from_budget(1))
    mb = loaded.model.experts.extents[0][0].nbytes / 2**20
    loaded.model.experts.close()
    return mb


@pytest.mark.parametrize("depth", [1, 2, 0], ids=["prefetch", "prefetch-2", "no-prefetch"])
@pytest.mark.parametrize("experts_cached", [0, 1.5, 6, 16, 1000])
def test_bit_identical_whatever_the_cache_holds(model_file, reference, experts_cached, depth):
    budget = experts_cached * expert_mb(model_file)
    prefetch = depth > 0
    loaded = load_model(model_file, StreamOptions.from_budget(budget, prefetch=prefetch, prefetch_depth=max(depth, 1),
                                                              queue_depth=2))
    got = run(loaded)
    st = loaded.model.experts.stats()
    spills = list(loaded.model.experts._spills)
    loaded.model.experts.close()
    assert np.array_equal(got, reference)
    assert st["io"]["reads"] > 0
    if experts_cached <= 16:  # experts evicted, or not kept (too large, or not admitted: used from a spill buffer)
        c = st["cache"]
        assert c["evictions"] > 0 or c["rejected_too_large"] > 0 or c["rejected_admission"] > 0
    if experts_cached == 16:  # 16 of 24: spill buffers are reused, within their share of the budget
        assert st["cache"]["rejected_admission"] > len(spills) > 0
        assert sum(a.nbytes for a in spills) <= budget * 2**20 / 8
    if experts_cached >= 1000:  # everything fits: each expert is read once (again only after a wasted prefetch)
        assert st["io"]["reads"] <= 3 * 8 + st["prefetch"]["wasted"]
    if prefetch:
        pf = st["prefetch"]
        assert pf["issued"] > 0 and set(pf["by_depth"]) <= set(range(1, depth + 1))
        for c in pf["by_depth"].values():  # every read issued is judged once, or still waits
            assert c["used_in_time"] + c["used_late"] + c["wasted"] <= c["issued"]
        assert sum(c["issued"] for c in pf["by_depth"].values()) == pf["issued"]


def test_buffered_fallback_identical(model_file, reference):
    loaded = load_model(model_file, StreamOptions.from_budget(2, direct_io=False))
    got = run(loaded)
    assert loaded.model.experts.stats()["io"]["direct_io"] is False
    loaded.model.experts.close()
    assert np.array_equal(got, reference)


def test_cli_json_reports_streaming(model_file, capsys):
    import json

    from edgemoe.cli import main

    assert main(["run", "-m", model_file, "--prompt-ids", "1,5,9", "-n", "4", "--cache-mb", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["cache"]) >= {"hit_rate", "hits", "misses", "bytes_read", "direct_io"}
    assert set(r["io"]) >= {"read_gb_s", "latency_ms_p50", "latency_ms_p99"}
    assert r["cache"]["bytes_read"] > 0 and "issued" in r["prefetch"]


@pytest.mark.parametrize("expert_qtype", ["Q5_0", "MXFP4"])
def test_other_interleaved_types_stream_bit_identical(expert_qtype, tmp_path):
    """Experts of the other types with an 8-row layout are repacked as they arrive, gate|up stacked: the logits
    are the memory-mapped model's (repacked at load) bit for bit."""
    _, cfg, tensors = make_hf_mixtral(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, experts=4,
                                      top_k=2, vocab=256, seed=6)
    path = tmp_path / "m.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype="Q8_0", expert_qtype=expert_qtype)
    resident = load_model(str(path))
    assert resident.model.experts.get(0, 0).gate_up.interleave == 8
    streamed = load_model(str(path), StreamOptions.from_budget(1))
    e = streamed.model.experts.get(0, 0)
    assert e.gate_up is not None and e.gate_up.interleave == 8 and e.down.interleave == 8
    np.testing.assert_array_equal(run(streamed), run(resident))


def test_look_ahead_hints_fewer_the_further(model_file, monkeypatch):
    """With depth 2, layer i hints layer i+1's router's top 2 per token and layer i+2's top 1, first choices
    first, each from the current hidden state — the routing of transformers' own router weights, via route()."""
    from edgemoe.models.base import rms_norm

    loaded = load_model(model_file, StreamOptions.from_budget(0, prefetch_depth=2))
    m, store = loaded.model, loaded.model.experts
    hints, seen = [], {}
    monkeypatch.setattr(store, "hint", lambda layer, experts, depth=1: hints.append((layer, list(experts), depth)))
    real = type(m)._routed

    def routed(self, h, x, layer, i, draft=None):
        seen[i] = x.copy()
        return real(self, h, x, layer, i, draft)

    monkeypatch.setattr(type(m), "_routed", routed)
    m.forward(np.asarray(PROMPT[:3]), m.new_cache(16))
    store.close()
    assert [(layer, d) for layer, _, d in hints] == [(1, 1), (2, 2), (2, 1)]
    for layer, experts, d in hints:
        nxt = m.weights.layers[layer]
        ids = m.route(rms_norm(seen[layer - d], nxt.post_attention_layernorm, m.args.rms_norm_eps), nxt)[0]  # (3, 2)
        want = ids[:, :2 // d].T.reshape(-1).tolist()
        assert experts == list(dict.fromkeys(want))


def test_wrong_predictions_are_dropped_at_their_layer(model_file):
    """Prefetches of a layer that its pass does not ask for are wasted (counted at their depth), the others used."""
    loaded = load_model(model_file, StreamOptions.from_budget(0, prefetch_depth=2))
    store = loaded.model.experts
    store.hint(1, [3, 0], depth=2)
    store.hint(2, [5], depth=1)
    assert store.prefetch.as_dict()["by_depth"] == {2: {"issued": 2, "used_in_time": 0, "used_late": 0, "wasted": 0},
                                                   1: {"issued": 1, "used_in_time": 0, "used_late": 0, "wasted": 0}}
    store.request(1, [3, 6])
    store.get(1, 3)
    store.get(1, 6)
    by = store.prefetch.as_dict()["by_depth"]
    assert by[2]["wasted"] == 1 and by[2]["used_in_time"] + by[2]["used_late"] == 1 and by[1]["wasted"] == 0
    assert store.prefetch.wasted == 1 and (2, 5) in store._pending
    store.close()


@pytest.mark.parametrize("depth, flag", [(2, None), (0, None), (2, 3)])
def test_prefetch_depth_from_config_and_flag(model_file, depth, flag):
    """routing.prefetch_depth reaches the store of a session built as serve --config builds it; --prefetch-depth
    overrides it; 0 turns prefetch off."""
    import argparse

    from edgemoe.config import load_config
    from edgemoe.engine.session import Session

    cfg = load_config(None, {"routing.prefetch_depth": depth})
    args = argparse.Namespace(model=model_file, overrides=[f"routing.prefetch_depth={depth}"], prefetch_depth=flag)
    session = Session(args, cfg, progress=False)
    try:
        assert session.model.experts.hint_depth == (flag if flag is not None else depth)
    finally:
        session.close()
