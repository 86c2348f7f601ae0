"""Tiny random MoE models of several Hugging Face families, saved as HF directories and converted to GGUF by
llama.cpp's own converter, for tests that compare the engine with transformers on both formats.

Families (HF `model_type` → GGUF `general.architecture`): qwen3_moe → qwen3moe, qwen2_moe → qwen2moe,
olmoe → olmoe, mixtral → llama. As in mixtral_factory.py, every parameter (norms, router, biases, shared-expert
gate included) is drawn from a seeded NumPy generator — norm weights ~ 1 + N(0, 0.1²), all others N(0, std²) —
in float32, and the model is returned in eval mode.

`save_hf` writes `model.save_pretrained` (transformers 5 always writes safetensors; its `safe_serialization`
argument is gone) plus a byte-level BPE tokenizer of exactly `vocab` tokens (see `make_tokenizer`).

`convert_to_gguf` / `convert_many` run llama.cpp's `convert_hf_to_gguf.py` from the llama-cpp-python sdist
(extracted by `llamacpp_sdist.extract_converter` into ~/.cache/edgemoe-test-convert) in one subprocess whose
PYTHONPATH starts with the sdist's gguf-py, so the converter writes with its own gguf version (the wrapper
asserts it). The one thing patched — in the subprocess only, the files on disk are untouched — is
`conversion.base.TextModel.get_vocab_base_pre`: upstream it hashes the tokenization of a check string and raises
NotImplementedError for any tokenizer it does not know (ours is random), so it is replaced by a function
returning a fixed pre-tokenizer name ("qwen2" unless told: our tokenizer does use Qwen2's split regex).
Everything else is the converter's `main()` unchanged, called once per job with the job's command line:
`set_vocab` still goes through `_set_vocab_gpt2` → `get_vocab_base` (AutoTokenizer on the directory) and
`gguf.SpecialVocab` (merges, bos/eos/pad ids, add_bos/add_eos, chat template), and tensor names, metadata keys,
expert merging and Q/K permutation are exactly what llama.cpp writes.

What the converter writes (llama-cpp-python 0.3.36, pinned by test_family_factory.py):
- qwen2moe / qwen3moe: Q/K not permuted; experts (saved per expert by save_pretrained) stacked as
  `ffn_{gate,up,down}_exps`; router `ffn_gate_inp`; no key for norm_topk_prob (llama.cpp hard-codes it:
  qwen3moe normalises, qwen2moe does not). qwen2moe adds `ffn_{gate,up,down}_shexp` and the shared-expert gate
  `ffn_gate_inp_shexp`, ne = [hidden, 1] (HF's (1, hidden); llama.cpp's loader takes it as [hidden]).
- Layers in `mlp_only_layers` (dense MLP) cannot be converted for qwen2moe / qwen3moe: the arch's tensor list
  has no ffn_gate/ffn_up/ffn_down, so the converter stops with "Can not map tensor" (and llama.cpp's loader
  requires a router in every layer); that job's result is a ConversionError.
- olmoe: Q/K not permuted; `attn_q_norm` ne = [hidden], `attn_k_norm` ne = [kv_heads·head_dim]; the converter
  overwrites the rms eps with 1e-5 whatever the config says (so olmoe models here use 1e-5) and writes neither
  clip_qkv nor norm_topk_prob (llama.cpp's olmoe graph applies neither). llama.cpp's loader wants
  attn_k_norm of size hidden, i.e. kv_heads == heads, for a GGUF it can load.
- mixtral → llama: Q and K rows permuted (LlamaModel.permute), experts stacked as `ffn_*_exps`.
- tie=True: no output.weight is written. f16 / bf16 / q8_0 keep norms and `ffn_gate_inp` in F32; q8_0 falls
  back to F16 for a tensor whose rows are not a multiple of 32 (e.g. ffn_down_exps with moe_intermediate=48).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama"}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the last three ids of every vocabulary
CONVERT_CACHE = pathlib.Path.home() / ".cache" / "edgemoe-test-convert"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2-*), followed by byte-level mapping without its own regex
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
# bytes of a vocabulary too small for all 256, most useful first (ASCII only: other bytes are then not encodable)
BYTE_ORDER = " etaoinshrdlcumwfgypbvkjxqz\n.,0123456789'\"-!?:;()ETAOINSHRDLCUMWFGYPBVKJXQZ\t/[]{}<>=+*_&%$#@|\\^`~"
MIN_VOCAB = len(SPECIALS) + 27  # space and a-z


class ConversionError(RuntimeError):
    """llama.cpp's converter failed; the message ends with its stderr."""


def special_ids(vocab: int) -> dict[str, int]:
    """bos / eos / pad ids of the models and tokenizers built here: <|endoftext|> is bos and pad, <|im_end|> eos."""
    endoftext, _, im_end = range(vocab - len(SPECIALS), vocab)
    return {"bos_token_id": endoftext, "eos_token_id": im_end, "pad_token_id": endoftext}


def randomize(model, seed: int, std: float, extra=lambda name: None):
    """Every parameter of `model` drawn from a NumPy generator seeded by `seed`: norm weights 1 + N(0, 0.1²),
    the others N(0, std²), unless `extra(name)` gives another std; float32, in place."""
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * rng.standard_normal(p.shape)
            else:
                v = (extra(name) or std) * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(v.astype(np.float32)))
    return rng


def rewrite_gguf(src: str, out, tensor=lambda t: (np.asarray(t.data), t.tensor_type)) -> str:
    """A copy of the GGUF file `src` at `out`, its metadata as it is and each tensor as `tensor(t)` says:
    (data, type) for a gguf.GGUFReader tensor, or None to leave it out."""
    from gguf import GGUFReader, GGUFWriter

    from edgemoe.pack.sources import _field_value

    r = GGUFReader(src)
    w = GGUFWriter(str(out), bytes(r.fields["general.architecture"].parts[-1]).decode())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = _field_value(key, field)
        if value is not None:
            w.add_key_value(key, *value)
    for t in r.tensors:
        got = tensor(t)
        if got is None:
            continue
        data, qtype = got
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order, in elements
        w.add_tensor(t.name, data, raw_shape=shape if qtype == t.tensor_type else None, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(out)


def make_hf_moe(family: str, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                head_dim: int | None = None, experts: int = 4, top_k: int = 2, moe_intermediate: int = 48,
                dense_intermediate: int = 96, vocab: int = 128, seed: int = 0, std: float = 0.08, tie: bool = False,
                norm_topk_prob: bool | None = None, shared_expert: bool | int | None = None, dense_layers=(),
                clip_qkv: float | None = None, **extra):
    """A random `{Qwen3Moe,Qwen2Moe,Olmoe,Mixtral}ForCausalLM` in eval mode and its config dict.

    - moe_intermediate: each routed expert's FFN width (`moe_intermediate_size`; olmoe and mixtral have only
      `intermediate_size`, which is then this). dense_intermediate: `intermediate_size` of qwen dense layers, and
      the default width of the qwen2_moe shared expert.
    - norm_topk_prob: None → the family's usual value (qwen3_moe True, qwen2_moe / olmoe False); mixtral always
      renormalises the top-k weights and rejects False.
    - shared_expert (qwen2_moe only): None / True → width dense_intermediate, an int → that width. False is
      rejected: transformers 5 always builds the shared expert and its gate (a width of 0 only gives empty
      weights, which llama.cpp's loader cannot use), so there is no qwen2_moe without one.
    - dense_layers (qwen only): layer indices with a dense MLP (`mlp_only_layers`; `decoder_sparse_step` is 1, so
      every other layer is sparse). Such models cannot be converted to GGUF (see the module docstring).
    - head_dim: qwen3_moe writes it to the config (default hidden // heads); qwen2_moe only when given;
      olmoe and mixtral need it to be None or hidden // heads (olmoe's q_norm spans the hidden size).
    - clip_qkv (olmoe only): clamp of q, k, v after the projections.
    - extra: further config fields, applied last (e.g. rope_parameters, rms_norm_eps, decoder_sparse_step).
    rope: theta 1e6 (olmoe 1e4), no scaling; no sliding window; max_position_embeddings 256; rms eps 1e-6 for
    qwen, 1e-5 for olmoe and mixtral. bos / eos / pad ids per `special_ids(vocab)`.
    """
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    dense_layers = sorted(set(dense_layers))
    if dense_layers and family not in ("qwen3_moe", "qwen2_moe"):
        raise ValueError(f"{family} has no dense layers (mlp_only_layers is a qwen option)")
    if shared_expert is not None and family != "qwen2_moe":
        raise ValueError(f"{family} has no shared expert")
    if shared_expert is False:
        raise ValueError("transformers' qwen2_moe always has a shared expert (width 0 gives empty weights)")
    if clip_qkv is not None and family != "olmoe":
        raise ValueError("clip_qkv is an olmoe option")
    if family in ("olmoe", "mixtral") and head_dim not in (None, hidden // heads):
        raise ValueError(f"{family} needs head_dim == hidden // heads")
    if family == "mixtral" and norm_topk_prob is False:
        raise ValueError("mixtral always renormalises its top-k routing weights")

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, num_experts_per_tok=top_k, max_position_embeddings=256,
                  tie_word_embeddings=tie, **special_ids(vocab))
    rope = lambda theta: {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}  # noqa: E731
    if family == "qwen3_moe":
        cls, cfg_cls = transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig
        kw = dict(head_dim=head_dim or hidden // heads, num_experts=experts, moe_intermediate_size=moe_intermediate,
                  intermediate_size=dense_intermediate, mlp_only_layers=dense_layers, decoder_sparse_step=1,
                  norm_topk_prob=True if norm_topk_prob is None else norm_topk_prob, attention_bias=False,
                  use_sliding_window=False, rms_norm_eps=1e-6, **rope(1e6))
    elif family == "qwen2_moe":
        cls, cfg_cls = transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig
        width = dense_intermediate if shared_expert in (None, True) else int(shared_expert)
        kw = dict(num_experts=experts, moe_intermediate_size=moe_intermediate, intermediate_size=dense_intermediate,
                  shared_expert_intermediate_size=width, mlp_only_layers=dense_layers, decoder_sparse_step=1,
                  norm_topk_prob=bool(norm_topk_prob), qkv_bias=True, use_sliding_window=False, rms_norm_eps=1e-6,
                  **rope(1e6))
        if head_dim is not None:
            kw["head_dim"] = head_dim
    elif family == "olmoe":
        cls, cfg_cls = transformers.OlmoeForCausalLM, transformers.OlmoeConfig
        kw = dict(num_experts=experts, intermediate_size=moe_intermediate, norm_topk_prob=bool(norm_topk_prob),
                  clip_qkv=clip_qkv, attention_bias=False, rms_norm_eps=1e-5, **rope(1e4))
    else:
        cls, cfg_cls = transformers.MixtralForCausalLM, transformers.MixtralConfig
        kw = dict(num_local_experts=experts, intermediate_size=moe_intermediate, head_dim=head_dim,
                  sliding_window=None, rms_norm_eps=1e-5, **rope(1e6))
    cfg = cfg_cls(**{**common, **kw, **extra})
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    randomize(model, seed, std)
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, cfg.to_dict()


def make_hf_deepseek(version: int, *, hidden: int = 64, layers: int = 3, heads: int = 4, experts: int = 8,
                     top_k: int = 3, moe_intermediate: int = 24, dense_intermediate: int = 80, shared: int = 2,
                     dense_first: int = 1, kv_lora_rank: int = 32, q_lora_rank: int | None = 48, nope: int = 16,
                     rope: int = 8, v_dim: int = 12, n_group: int = 4, topk_group: int = 2, routed_scale=1.5,
                     yarn: dict | None = None, vocab: int = 128, seed: int = 0, std: float = 0.08, **extra):
    """A random `DeepseekV{2,3}ForCausalLM` in eval mode and its config dict, drawn as `make_hf_moe` draws
    (V3's e_score_correction_bias buffer too, N(0, 0.05²)). V2 routes with group_limited_greedy when n_group > 1;
    V3 always by groups, with scoring_func "sigmoid" and topk_method "noaux_tc" as the released configs say (what
    llama.cpp's converter reads to write the gating function). yarn: YaRN rope_parameters (factor, mscale, ...)."""
    import torch
    import transformers

    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn is not None:
        rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, **yarn}
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank,
                  qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_dim, n_routed_experts=experts,
                  n_shared_experts=shared, moe_intermediate_size=moe_intermediate,
                  intermediate_size=dense_intermediate, first_k_dense_replace=dense_first, num_experts_per_tok=top_k,
                  routed_scaling_factor=routed_scale, rope_parameters=rope_parameters, **special_ids(vocab))
    if version == 2:
        cls, cfg_cls = transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config
        kw = dict(topk_method="group_limited_greedy", n_group=n_group, topk_group=topk_group) if n_group > 1 else \
            dict(topk_method="greedy")
    else:
        cls, cfg_cls = transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config
        kw = dict(n_group=n_group, topk_group=topk_group, norm_topk_prob=True, scoring_func="sigmoid",
                  topk_method="noaux_tc")
    cfg = cfg_cls(**{**common, **kw, **extra})
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    rng = randomize(model, seed, std)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.from_numpy((0.05 * rng.standard_normal(b.shape)).astype(np.float32)))
    return model, cfg.to_dict()


def make_hf_gpt_oss(*, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                    experts: int = 4, top_k: int = 2, intermediate: int = 32, window: int = 4, yarn: bool = True,
                    vocab: int = 128, seed: int = 0, std: float = 0.08, **extra):
    """A random `GptOssForCausalLM` in eval mode and its config dict, drawn as `make_hf_moe` draws (the sinks
    N(0, 0.5²) so they matter). Layers alternate sliding (window `window`) and full attention, sliding first,
    as the released models and llama.cpp's gpt-oss graph have them; YaRN as gpt-oss-20b's config (truncate off)
    with a short original context so that it changes the tables."""
    import torch
    import transformers

    rope = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 64, "rope_theta": 150000.0} if yarn else \
        {"rope_type": "default", "rope_theta": 150000.0}
    cfg = transformers.GptOssConfig(**{**dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=window, max_position_embeddings=256, rms_norm_eps=1e-5,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        rope_parameters=rope, tie_word_embeddings=False, **special_ids(vocab)), **extra})
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).float().eval()
    randomize(model, seed, std, lambda name: 0.5 if name.endswith("sinks") else None)
    return model, cfg.to_dict()


def make_tokenizer(vocab: int):
    """A byte-level BPE `tokenizers.Tokenizer` of exactly `vocab` tokens (30 ≤ vocab ≲ 100 000), the same for the
    same `vocab` (built once per process, a fresh object each call).

    Qwen2-style pipeline: NFC normaliser, Qwen2's split regex then byte-level mapping, byte-level decoder, no
    bos added. Ids: the byte alphabet and BPE merges (trained on a fixed ASCII corpus) first, then
    <|endoftext|>, <|im_start|>, <|im_end|> as the last three. With vocab ≥ 259 the alphabet is all 256 bytes,
    so any text encodes; below that it is the first vocab - 3 characters of BYTE_ORDER (printable ASCII, \\n,
    \\t), and characters outside it are dropped by the encoder.
    """
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json(vocab))


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab: int) -> str:
    import random

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if vocab < MIN_VOCAB:
        raise ValueError(f"vocab must be at least {MIN_VOCAB}")
    n_base = vocab - len(SPECIALS)
    byts = list(range(256)) if n_base >= 256 else [ord(c) for c in BYTE_ORDER[:n_base]]
    b2u = bytes_to_unicode()
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    ascii_ = [b for b in byts if b < 128]
    chars = "".join(chr(b) for b in ascii_)
    words = "the of and to in is that it for on with as was mixture experts router token model hello world".split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) if rng.random() < 0.6 else
                       "".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) for _ in range(12))
              for _ in range(400 + vocab // 2)]
    allowed = set(chars)
    corpus = ["".join(c for c in line if c in allowed) for line in corpus]
    trainer = trainers.BpeTrainer(vocab_size=n_base, initial_alphabet=[b2u[b] for b in byts], limit_alphabet=len(byts),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if tok.get_vocab_size() != n_base:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, not {n_base}")
    tok.add_special_tokens(list(SPECIALS))
    assert tok.get_vocab_size() == vocab and tok.token_to_id(SPECIALS[-1]) == vocab - 1
    return tok.to_str()


def save_tokenizer(directory, vocab: int) -> None:
    """tokenizer.json (`make_tokenizer(vocab)`) and a tokenizer_config.json that AutoTokenizer loads as is
    (PreTrainedTokenizerFast, bos <|endoftext|>, eos <|im_end|>, pad <|endoftext|>, no bos/eos added, a ChatML
    chat template)."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    make_tokenizer(vocab).save(str(d / "tokenizer.json"))
    endoftext, _, im_end = SPECIALS
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": endoftext, "eos_token": im_end,
        "pad_token": endoftext, "add_bos_token": False, "add_eos_token": False, "model_max_length": 256,
        "clean_up_tokenization_spaces": False, "chat_template": CHATML}, indent=1))


def save_hf(model, cfg: dict, directory, tokenizer: bool = True) -> str:
    """`model.save_pretrained(directory)` (config.json, generation_config.json, model.safetensors) and, unless
    told not to, the tokenizer of `save_tokenizer(directory, cfg["vocab_size"])`. Returns the directory."""
    d = pathlib.Path(directory)
    model.save_pretrained(d)
    if tokenizer:
        save_tokenizer(d, cfg["vocab_size"])
    return str(d)


# Runs in the converter's subprocess: argv = [wrapper, converter_dir, pre_tokenizer_name, JSON list of converter
# argument lists]. Each job runs the converter's main() unchanged, between marker lines on stderr.
_WRAPPER = """
import json, sys, traceback
conv_dir, pre, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, conv_dir)
import gguf
assert gguf.__file__.startswith(conv_dir), ("not the sdist's gguf-py", gguf.__file__)
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre  # the only patch: no hash lookup of the tokenizer
for i, args in enumerate(jobs):
    print(f"@@job {i}", file=sys.stderr, flush=True)
    sys.argv = [conv_dir + "/convert_hf_to_gguf.py", *args]
    try:
        convert_hf_to_gguf.main()
        ok = True
    except SystemExit as e:
        ok = e.code in (None, 0)
    except Exception:
        traceback.print_exc()
        ok = False
    print(f"@@{'ok' if ok else 'failed'} {i}", file=sys.stderr, flush=True)
"""


def converter_dir(cache: pathlib.Path | None = None) -> pathlib.Path:
    """The extracted converter in `cache` (default CONVERT_CACHE), downloading the sdist on first use; raises
    what `llamacpp_sdist.extract_converter` raises (OSError, SubprocessError, TarError, StopIteration)."""
    from llamacpp_sdist import extract_converter

    return extract_converter(CONVERT_CACHE if cache is None else cache)


def convert_many(jobs, *, pre: str = "qwen2", timeout: float = 600) -> list:
    """Each (hf_dir, out_path, outtype) of `jobs` through `convert_hf_to_gguf.py hf_dir --outfile out_path
    --outtype outtype` (f32, f16, bf16 or q8_0), all in one subprocess (the converter's imports take seconds),
    with the tokenizer's pre-tokenizer name forced to `pre` (see the module docstring). Returns, in order, the
    output path or the ConversionError (with that job's log) of each job; raises what `converter_dir` raises
    when the converter cannot be had, and ConversionError when the subprocess itself fails."""
    jobs = [(str(d), str(out), outtype) for d, out, outtype in jobs]
    for _, _, outtype in jobs:
        if outtype not in OUTTYPES:
            raise ValueError(f"outtype must be one of {OUTTYPES}")
    conv = converter_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("NO_LOCAL_GGUF", None)
    args = [[d, "--outfile", out, "--outtype", outtype] for d, out, outtype in jobs]
    r = subprocess.run([sys.executable, "-c", _WRAPPER, str(conv), pre, json.dumps(args)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    logs = r.stderr.split("@@job ")[1:]
    if r.returncode != 0 or len(logs) != len(jobs):
        raise ConversionError(f"the converter's process failed ({r.returncode}):\n{r.stderr[-4000:]}")
    out: list = []
    for (d, path, _), log in zip(jobs, logs):
        if "@@ok " in log and pathlib.Path(path).is_file():
            out.append(path)
        else:
            out.append(ConversionError(f"convert_hf_to_gguf.py failed on {d}:\n{log[-4000:]}"))
    return out


def convert_to_gguf(hf_dir, out_path, outtype: str = "f32", *, pre: str = "qwen2", timeout: float = 300) -> str:
    """One job of `convert_many`: returns out_path, raises its ConversionError."""
    (res,) = convert_many([(hf_dir, out_path, outtype)], pre=pre, timeout=timeout)
    if isinstance(res, ConversionError):
        raise res
    return res
