"""Tiny random Mixtral models built with transformers, for tests that need an HF oracle.

Every parameter (norms and router included) is drawn from a seeded NumPy generator, so a swapped or
mis-mapped tensor always changes the output. The per-expert layout is produced by transformers'
own `save_pretrained`, so neither layout is our reconstruction.
"""

from __future__ import annotations

import tempfile

import numpy as np

# transformers 5 keeps experts fused in memory (state_dict) and writes them per expert on save_pretrained.
FUSED_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"  # (E, 2I, D) = [w1; w3]
FUSED_DOWN = "model.layers.{i}.mlp.experts.down_proj"  # (E, D, I) = w2
SPLIT = "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
ROUTER_SPLIT = "model.layers.{i}.block_sparse_moe.gate.weight"
ROUTER_FUSED = "model.layers.{i}.mlp.gate.weight"


def make_hf_mixtral(
    *,
    hidden: int = 64,
    intermediate: int = 96,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    experts: int = 4,
    top_k: int = 2,
    vocab: int = 128,
    tie: bool = False,
    seed: int = 0,
    head_dim: int | None = None,
    std: float = 0.08,
):
    """A random `MixtralForCausalLM` in eval mode, its config.json dict, and its checkpoint tensors.

    Returns (model, config_dict, tensors): tensors are float32 NumPy arrays under the per-expert names
    of an HF checkpoint (`block_sparse_moe.experts.{e}.w1/w2/w3.weight`), as save_pretrained writes them.
    Weights ~ N(0, std²); norm weights ~ 1 + N(0, 0.1²).
    """
    import torch
    from safetensors.numpy import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts,
        num_experts_per_tok=top_k, max_position_embeddings=256, tie_word_embeddings=tie, head_dim=head_dim,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).float().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                v = 1.0 + 0.1 * rng.standard_normal(p.shape)
            else:
                v = std * rng.standard_normal(p.shape)
            p.copy_(torch.from_numpy(v.astype(np.float32)))
        if tie:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in load_file(f"{d}/model.safetensors").items()}
    return model, cfg.to_dict(), tensors


def to_fused_layout(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert checkpoint names → transformers-5 fused names (`mlp.experts.gate_up_proj`, `down_proj`,
    `mlp.gate.weight`); other tensors are passed through."""
    out: dict[str, np.ndarray] = {}
    layers: dict[int, dict[str, dict[int, np.ndarray]]] = {}
    for name, a in tensors.items():
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[3] == "block_sparse_moe":
            i = int(parts[2])
            if parts[4] == "gate":
                out[ROUTER_FUSED.format(i=i)] = a
            else:  # model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight
                layers.setdefault(i, {}).setdefault(parts[6], {})[int(parts[5])] = a
        else:
            out[name] = a
    for i, ws in layers.items():
        n = len(ws["w1"])
        w1, w2, w3 = (np.stack([ws[w][e] for e in range(n)]) for w in ("w1", "w2", "w3"))
        out[FUSED_GATE_UP.format(i=i)] = np.concatenate([w1, w3], axis=1)  # (E, 2I, D)
        out[FUSED_DOWN.format(i=i)] = w2  # (E, D, I)
    return out


def tiny_gguf_with_vocab(directory, qtype: str = "F32", expert_qtype: str | None = None) -> tuple[str, object, object]:
    """A tiny Mixtral GGUF (F32 unless told) carrying the default model's word-level vocabulary, in `directory`.

    Returns (path, the transformers model it was exported from, our tokenizer of that vocabulary).
    """
    from edgemoe.default_model import write_vocab
    from edgemoe.formats.gguf_export import export_mixtral_gguf
    from edgemoe.tokenizer import load_tokenizer

    vocab = f"{directory}/vocab.gguf"
    write_vocab(vocab)
    tok = load_tokenizer(vocab)
    hf, cfg, tensors = make_hf_mixtral(vocab=tok.vocab_size, hidden=64, layers=2)
    path = f"{directory}/tiny.gguf" if (qtype, expert_qtype) == ("F32", None) else \
        f"{directory}/tiny-{qtype}-{expert_qtype or qtype}.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype=qtype, expert_qtype=expert_qtype, tokenizer_from=vocab)
    return path, hf, tok


def mixtral_gguf(path, qtype: str = "Q8_0", expert_qtype: str = "Q4_0", **shape) -> str:
    """A random Mixtral (`make_hf_mixtral(**shape)`) written as a GGUF file at `path` with these tensor types."""
    from edgemoe.formats.gguf_export import export_mixtral_gguf

    _, cfg, tensors = make_hf_mixtral(**shape)
    export_mixtral_gguf(path, cfg, tensors, qtype=qtype, expert_qtype=expert_qtype)
    return str(path)
