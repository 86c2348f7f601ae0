"""llama.cpp (through llama-cpp-python) as a test oracle: logits and greedy continuations of a GGUF file."""

from __future__ import annotations

import numpy as np


def load(path):
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
        type_k=0, type_v=0,  # F32 KV cache: the default F16 cache alone costs ~1e-3 relative
    )


def run(llm, ids: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp's logits for `ids` (T, V) and its greedy continuation of `n` tokens."""
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
    greedy = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, reset=True):
        greedy.append(int(tok))
        if len(greedy) == n:
            break
    return logits, greedy


def engine_run(path, ids: list[int], n: int, fused: bool = True) -> tuple[np.ndarray, list[int]]:
    """edgemoe on the same file, as `run` asks llama.cpp: logits (T, V) with an F32 KV cache, and greedy tokens.
    fused=False: kernel by kernel (the fused blocks give the same bits: tests/test_fused.py, the types' tests)."""
    from edgemoe.loader import load_model

    m = load_model(str(path)).model
    m.fused = fused
    cache = m.new_cache(64, "f32")
    logits = m.forward(np.asarray(ids), cache, all_logits=True)  # (T, V)
    greedy, last = [], logits[-1]
    for _ in range(n):
        greedy.append(int(np.argmax(last)))
        last = m.forward(np.asarray(greedy[-1:]), cache)[-1]
    return logits, greedy
