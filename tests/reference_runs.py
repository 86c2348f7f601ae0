"""Reference runs shared by the model tests: transformers (on HF weights or on gguf-py's dequantisation of a
GGUF file) and the engine, as logits and greedy continuations."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from edgemoe.formats.names import GGUF_TO_HF
from edgemoe.loader import load_model


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # (T, V)


def hf_greedy(model, ids, n) -> list[int]:
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(hf_logits(model, ids)[-1]))
        out.append(nxt)
        ids.append(nxt)
    return out


def engine_logits(path, ids, cache_type: str = "f32") -> np.ndarray:
    """Every position's logits; an f32 KV cache by default (the reference's arithmetic)."""
    m = load_model(str(path)).model
    return m.forward(np.asarray(ids), m.new_cache(64, cache_type), all_logits=True)


def engine_greedy(path, ids, n, cache_type: str = "f16") -> list[int]:
    """Greedy tokens; the engine's default f16 KV cache unless told (what `run` and `serve` use)."""
    m = load_model(str(path)).model
    cache = m.new_cache(64, cache_type)
    logits = m.forward(np.asarray(ids), cache)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = m.forward(np.asarray(out[-1:]), cache)[-1]
    return out


def dequantised_reference(model, cfg, path):
    """transformers' model with every weight replaced by gguf-py's dequantisation of the GGUF tensor."""
    reverse_permute = LlamaTensorProcessor()._reverse_permute_weights
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hf_names = {}
    for g, hf in GGUF_TO_HF.items():
        for i in range(cfg["num_hidden_layers"]):
            hf_names[g.format(i=i)] = hf.format(i=i)
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        if ".attn_q." in t.name:
            w = reverse_permute(w, h, h)
        elif ".attn_k." in t.name:
            w = reverse_permute(w, h, kv)
        if "_exps." in t.name:
            i = int(t.name.split(".")[1])
            proj = t.name.split(".")[2]
            key = f"model.layers.{i}.mlp.experts."
            if proj == "ffn_down_exps":
                state[key + "down_proj"] = w
            else:
                state.setdefault(key + "gate_up_proj", {})[proj] = w
        else:
            state[hf_names[t.name]] = w
    for k, v in list(state.items()):
        if isinstance(v, dict):
            state[k] = np.concatenate([v["ffn_gate_exps"], v["ffn_up_exps"]], axis=1)
    if "lm_head.weight" not in state:  # tied: the output head is the embedding
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    new = {k: torch.from_numpy(state[k]) for k in model.state_dict()}
    ref = type(model)(model.config).eval()
    ref.load_state_dict(new)
    return ref


