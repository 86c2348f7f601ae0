"""Every family of the architecture registry against transformers, on HF checkpoints and on GGUF files written by
llama.cpp's own converter (tests/family_factory.py): logits within 1e-4 of the logits' scale with an f32 KV cache,
32 greedy tokens identical; batched rows, streamed experts and packs bit-identical to one resident sequence; and
one clear line for what the engine cannot honour.

Dense layers between MoE layers (Qwen's mlp_only_layers) are checked on checkpoints only: llama.cpp's converter
cannot write them for these archs. A GGUF file carries no norm_topk_prob or clip_qkv: llama.cpp's graph hard-codes
them per arch (qwen3moe renormalises, qwen2moe and olmoe do not, olmoe never clamps). Cases whose HF config
differs from that compare their HF checkpoint only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from family_factory import (  # noqa: E402
    ConversionError,
    convert_many,
    make_hf_deepseek,
    make_hf_gpt_oss,
    make_hf_moe,
    rewrite_gguf,
    save_hf,
    special_ids,
)
from reference_runs import hf_greedy, hf_logits  # noqa: E402

from edgemoe.cli import main  # noqa: E402
from edgemoe.experts.setup import StreamOptions  # noqa: E402
from edgemoe.loader import load_model  # noqa: E402

PROMPT = [1, 17, 43, 99, 120, 7, 64, 3, 88, 25, 12]

# case → (family, factory options, the GGUF means the same as the checkpoint)
CASES = {
    "qwen3_moe-gqa": ("qwen3_moe", dict(heads=4, kv_heads=2, head_dim=24, experts=4, top_k=2), True),
    "qwen3_moe-top8": ("qwen3_moe", dict(heads=4, kv_heads=1, experts=16, top_k=8, moe_intermediate=32), True),
    "qwen3_moe-top1-plain": ("qwen3_moe", dict(heads=2, kv_heads=2, experts=6, top_k=1, norm_topk_prob=False),
                             False),
    "qwen2_moe": ("qwen2_moe", dict(heads=4, kv_heads=2, experts=4, top_k=2), True),
    "qwen2_moe-top4-renorm": ("qwen2_moe", dict(heads=4, kv_heads=1, experts=8, top_k=4, norm_topk_prob=True,
                                                shared_expert=40), False),
    "qwen3_moe-dense0": ("qwen3_moe", dict(layers=3, experts=4, top_k=2, dense_layers=(0,)), False),
    "qwen2_moe-dense1": ("qwen2_moe", dict(layers=3, experts=4, top_k=2, dense_layers=(1,)), False),
    "olmoe": ("olmoe", dict(heads=4, kv_heads=4, experts=4, top_k=2), True),
    "olmoe-gqa-top6": ("olmoe", dict(heads=4, kv_heads=2, experts=8, top_k=6), True),
    "olmoe-clip": ("olmoe", dict(heads=4, kv_heads=4, experts=6, top_k=2, clip_qkv=0.4), False),
    # DeepSeek: latent attention, a dense first layer, shared experts; llama.cpp's YaRN keys keep mscale_all_dim
    # only, so a GGUF means the same when mscale == mscale_all_dim (as in the released configs)
    "deepseek_v2-lite": ("deepseek_v2", dict(q_lora_rank=None, n_group=1, routed_scale=1.0,
                                             yarn=dict(factor=4.0, original_max_position_embeddings=32,
                                                       mscale=0.707, mscale_all_dim=0.707)), True),
    "deepseek_v2-groups": ("deepseek_v2", dict(n_group=4, topk_group=2, top_k=4), True),
    "deepseek_v3": ("deepseek_v3", dict(n_group=4, topk_group=2, routed_scale=2.5), True),
    "deepseek_v3-yarn-mscale": ("deepseek_v3", dict(yarn=dict(factor=8.0, original_max_position_embeddings=32,
                                                              mscale=1.0, mscale_all_dim=0.5)), False),
    # gpt-oss: sinks, a sliding window of 4 positions on even layers (the prompt is longer), YaRN, biases
    "gpt_oss": ("gpt_oss", dict(), True),
    "gpt_oss-top1-mha": ("gpt_oss", dict(layers=3, kv_heads=4, experts=6, top_k=1, window=3, yarn=False), True),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case → (transformers model, HF directory, GGUF f32 path or None, GGUF q8_0 path or None)."""
    root = tmp_path_factory.mktemp("families")
    built, jobs = {}, []
    for n, (case, (family, opts, same)) in enumerate(CASES.items()):
        if family.startswith("deepseek"):
            model, cfg = make_hf_deepseek(int(family[-1]), seed=10 + n, **opts)
        elif family == "gpt_oss":
            model, cfg = make_hf_gpt_oss(seed=10 + n, **opts)
        else:
            model, cfg = make_hf_moe(family, seed=10 + n, **opts)
        d = save_hf(model, cfg, root / case)
        files = [None, None]
        if same:
            files = [str(root / f"{case}.gguf"), str(root / f"{case}.q8.gguf")]
            jobs += [(d, files[0], "f32"), (d, files[1], "q8_0")]
        built[case] = (model, d, *files)
    try:
        done = convert_many(jobs)
    except (OSError, ConversionError) as e:  # the converter could not be had (offline, no cache)
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    for r in done:
        assert not isinstance(r, ConversionError), r
    return built


def engine_logits(path, ids, **load) -> np.ndarray:
    m = load_model(str(path), **load).model
    return m.forward(np.asarray(ids), m.new_cache(64, "f32"), all_logits=True)  # (T, V)


def close(got, ref):
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 1e-4 * scale, (np.abs(got - ref).max(), scale)


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_matches_transformers(models, case):
    model, d, *_ = models[case]
    loaded = load_model(d)
    assert loaded.args.model_type == CASES[case][0]
    close(engine_logits(d, PROMPT), hf_logits(model, PROMPT))


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[2]])
def test_llamacpp_gguf_matches_transformers(models, case):
    model, _, gguf_path, _ = models[case]
    close(engine_logits(gguf_path, PROMPT), hf_logits(model, PROMPT))


@pytest.mark.parametrize("case", ["qwen3_moe-gqa", "qwen2_moe", "olmoe-gqa-top6", "olmoe-clip", "qwen2_moe-dense1",
                                  "deepseek_v2-lite", "deepseek_v3", "gpt_oss"])
def test_greedy_tokens_equal_transformers(models, case):
    model, d, gguf_path, _ = models[case]
    want = hf_greedy(model, PROMPT, 32)
    for path in (d, gguf_path) if gguf_path else (d,):
        m = load_model(path).model
        cache = m.new_cache(64, "f32")
        logits = m.forward(np.asarray(PROMPT), cache)[-1]
        got = []
        for _ in range(32):
            got.append(int(np.argmax(logits)))
            logits = m.forward(np.asarray(got[-1:]), cache)[-1]
        assert got == want, path


@pytest.mark.parametrize("case", ["qwen3_moe-gqa", "qwen2_moe", "olmoe-gqa-top6", "deepseek_v3", "gpt_oss"])
def test_batched_rows_bit_identical(models, case):
    """Q8_0 weights (the interleaved kernels), the default f16 cache: three sequences in one pass, each row the
    bits of that sequence alone, in prefill and in decode steps."""
    q8 = models[case][3]
    m = load_model(q8).model
    seqs = [PROMPT, PROMPT[:5], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    alone = []
    for s in seqs:
        c = m.new_cache(64)
        alone.append((m.forward(np.asarray(s), c, all_logits=True), m.forward(np.asarray([5]), c)))
    caches = [m.new_cache(64) for _ in seqs]
    pre = m.forward_batch([(np.asarray(s), c) for s, c in zip(seqs, caches)], rows=[len(s) for s in seqs])
    step = m.forward_batch([(np.asarray([5]), c) for c in caches])
    at = 0
    for j, s in enumerate(seqs):
        assert np.array_equal(pre[at:at + len(s)], alone[j][0])
        assert np.array_equal(step[j], alone[j][1][0])
        at += len(s)


@pytest.mark.parametrize("case", ["gpt_oss", "gpt_oss-top1-mha"])
def test_gpt_oss_fused_blocks_bit_identical(models, case, monkeypatch):
    """gpt-oss's attention (sinks, sliding window, biases) and experts (biases, the clamped SwiGLU) in the fused
    one-token and several-token blocks: the bits of the separate kernels over a prefill and decode steps (past
    the window), and the fused blocks are the path taken."""
    from edgemoe.kernels import fused

    m = load_model(models[case][3]).model

    def run(on: bool) -> np.ndarray:
        m.fused = on
        c = m.new_cache(64)
        out = [m.forward(np.asarray(PROMPT), c, all_logits=True)]
        out += [m.forward(np.asarray([t]), c) for t in (5, 9, 2)]
        return np.concatenate(out)

    want = run(False)
    calls = []
    blocks = ("moe_block", "moe_rows_block", "attention_block", "attention_seqs_block")
    for name in blocks:
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    got = run(True)
    assert set(blocks) <= set(calls)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("case", ["qwen3_moe-top8", "qwen2_moe", "olmoe", "deepseek_v2-groups", "gpt_oss-top1-mha"])
def test_streamed_and_packed_bit_identical(models, case, tmp_path):
    """Experts read from disk into a cache of a few experts, from the converter's file and from its pack:
    the resident model's logits, bit for bit, over a prefill and decode steps."""
    from gguf import GGUFReader

    from edgemoe.partition import partition

    q8 = models[case][3]

    def run(loaded):
        m = loaded.model
        c = m.new_cache(64)
        out = [m.forward(np.asarray(PROMPT), c, all_logits=True)]
        for _ in range(6):
            out.append(m.forward(np.asarray([int(np.argmax(out[-1][-1]))]), c))
        if hasattr(m.experts, "close"):
            m.experts.close()
        return np.concatenate(out)

    want = run(load_model(q8))
    pack = tmp_path / "p.gguf"
    partition(q8, str(pack))
    arch = GGUFReader(str(pack)).fields["general.architecture"]
    assert bytes(arch.parts[-1]).decode() == GGUFReader(q8).fields["general.architecture"].parts[-1].tobytes().decode()
    for path in (q8, str(pack)):
        assert np.array_equal(run(load_model(path, StreamOptions.from_budget(0.05))), want), path


def test_run_command_on_each_family(models, capsys):
    """`edgemoe run` on a checkpoint of each family (its tokenizer.json): the greedy ids transformers gives, up to
    and including the end-of-sequence token, on a prompt transformers does not end at once."""
    eos = special_ids(128)["eos_token_id"]
    for case in ("qwen3_moe-gqa", "qwen2_moe", "olmoe", "deepseek_v2-lite", "gpt_oss"):
        model, d, *_ = models[case]
        prompt, want = next((p, w) for p in (PROMPT, PROMPT[::-1], PROMPT[3:], [5, 6, 7, 8])
                            if (w := hf_greedy(model, p, 8))[0] != eos)
        if eos in want:
            want = want[:want.index(eos) + 1]
        code = main(["run", "-m", d, "--prompt-ids", ",".join(map(str, prompt)), "-n", "8", "--temp", "0",
                     "--cache-type", "f32", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["token_ids"] == want, case


def _edited(models, tmp_path, case, edit):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(models[case][1], d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_deepseek_latent_cache_types(tmp_path):
    """DeepSeek's compressed cache in f16 (the default) and q8_0: logits within the rounding of the cached latents
    of the f32 cache's, over a prefill and decode steps; q8_0 needs a row width that is a multiple of 32 and says
    so in one line otherwise."""
    from edgemoe.errors import UsageError

    model, cfg = make_hf_deepseek(3, kv_lora_rank=56, rope=8, seed=41)  # rows of 56 + 8 = 64 values
    m = load_model(save_hf(model, cfg, tmp_path / "ds")).model
    runs = {}
    for cache_type in ("f32", "f16", "q8_0"):
        c = m.new_cache(64, cache_type)
        assert c.k.nbytes == {"f32": 4 * 64, "f16": 2 * 64, "q8_0": 68}[cache_type] * 3 * 64  # L, S, row
        out = [m.forward(np.asarray(PROMPT), c, all_logits=True)] + [m.forward(np.asarray([t]), c) for t in (5, 9)]
        runs[cache_type] = np.concatenate(out)
    scale = np.abs(runs["f32"]).max()
    assert np.abs(runs["f16"] - runs["f32"]).max() <= 2e-3 * scale
    assert np.abs(runs["q8_0"] - runs["f32"]).max() <= 2e-2 * scale
    assert not np.array_equal(runs["f16"], runs["f32"])  # the cache's type is the one asked for
    narrow, _ = make_hf_deepseek(3, seed=42)  # 32 + 8 = 40 values per row
    with pytest.raises(UsageError, match="multiple of 32"):
        load_model(save_hf(narrow, _, tmp_path / "narrow")).model.new_cache(16, "q8_0")


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(model_type="dbrx"), "model_type 'dbrx' is not supported"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (lambda c: c.update(mlp_only_layers=[1, "x"]), "mlp_only_layers"),
    (lambda c: c.update(use_sliding_window=True, sliding_window=64), "sliding_window"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
], ids=["unknown-family", "rope-scaling", "dense-layers", "sliding-window", "activation"])
def test_what_cannot_be_honoured_is_one_line(models, tmp_path, capsys, edit, needle):
    d = _edited(models, tmp_path, "qwen3_moe-gqa", edit)
    code = main(["run", "-m", d, "--prompt-ids", "1,2", "-n", "2"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("edgemoe: loading ")]
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_missing_family_tensor_is_one_line(models, tmp_path, capsys):
    """A Qwen3-MoE GGUF without a layer's q_norm: named, exit 2."""
    out = rewrite_gguf(models["qwen3_moe-gqa"][2], tmp_path / "cut.gguf",
                       lambda t: None if t.name == "blk.1.attn_q_norm.weight" else (np.asarray(t.data), t.tensor_type))
    code = main(["run", "-m", out, "--prompt-ids", "1,2", "-n", "2"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("edgemoe: loading ")]
    assert code == 2 and len(err) == 1 and "blk.1.attn_q_norm.weight" in err[0], err
