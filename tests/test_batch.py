"""One forward pass for several sequences gives each sequence exactly the logits it gets alone.

The server batches the decode tokens of all running requests and chunks of new prompts into one
pass; `temperature: 0` outputs must not depend on what else is in the batch. Here the batched
logits must be bit-identical to `Model.forward` on each sequence by itself (whole prompt, then one
token at a time, as `edgemoe run` does), for float and block-quantised weights — and the
single-sequence pass itself is checked against transformers in test_mixtral.py. Both KV cache types.
"""

from __future__ import annotations

import numpy as np
import pytest
from mixtral_factory import make_hf_mixtral

from edgemoe.formats.gguf_export import export_mixtral_gguf
from edgemoe.kernels import set_threads
from edgemoe.loader import load_model

PROMPTS = [[1, 7, 42, 99, 3, 64, 17, 5, 120, 33, 8], [5, 9], [77, 3, 3, 100, 2, 45, 6]]
DECODE = [[12, 40, 7], [3, 3, 90], [101, 55, 2]]  # fed tokens after each prompt


@pytest.fixture(scope="module", params=[("F32", "F32"), ("Q8_0", "Q4_0"), ("Q8_0", "Q8_0"), ("Q4_K", "Q4_K")])
def model(request, tmp_path_factory):
    dense, experts = request.param
    _, cfg, tensors = make_hf_mixtral(hidden=256, intermediate=256, heads=4, kv_heads=2, experts=4, top_k=2,
                                      vocab=128, seed=3)
    path = tmp_path_factory.mktemp("batch") / f"{dense}-{experts}.gguf"
    export_mixtral_gguf(path, cfg, tensors, qtype=dense, expert_qtype=experts)
    m = load_model(str(path)).model
    m.case = request.param
    return m


def alone(m, prompt: list[int], fed: list[int]) -> list[np.ndarray]:
    """Last-token logits after the prompt and after each fed token, one sequence at a time."""
    cache = m.new_cache(32)
    out = [m.forward(np.asarray(prompt), cache)[-1]]
    out += [m.forward(np.asarray([t]), cache)[-1] for t in fed]
    return out


@pytest.mark.parametrize("threads,cache_type", [(1, "f16"), (2, "f16"), (2, "f32"), (2, "q8_0")])
def test_batched_steps_equal_single_sequences(model, threads, cache_type):
    if cache_type != "f16" and model.case != ("Q8_0", "Q4_0"):
        pytest.skip(f"the {cache_type} cache is checked with Q8_0/Q4_0 weights (as in test_fused)")
    set_threads(threads)
    model.cache_type = cache_type
    try:
        want = [alone(model, p, f) for p, f in zip(PROMPTS, DECODE)]
        caches = [model.new_cache(32) for _ in PROMPTS]
        got: list[list[np.ndarray]] = [[] for _ in PROMPTS]
        # Step 1: sequence 0's prompt in two chunks over two steps, sequence 1 whole; sequence 2 joins later.
        first = model.forward_batch([(PROMPTS[0][:6], caches[0]), (PROMPTS[1], caches[1])])
        got[1].append(first[1])
        second = model.forward_batch([(PROMPTS[0][6:], caches[0]), (DECODE[1][:1], caches[1]),
                                      (PROMPTS[2], caches[2])])
        got[0].append(second[0])
        got[1].append(second[1])
        got[2].append(second[2])
        # Then every sequence decodes, one token each per step, until its fed tokens run out.
        pos = [0, 1, 0]
        while any(p < len(f) for p, f in zip(pos, DECODE)):
            live = [j for j in range(3) if pos[j] < len(DECODE[j])]
            rows = model.forward_batch([(DECODE[j][pos[j]:pos[j] + 1], caches[j]) for j in live])
            for j, row in zip(live, rows):
                got[j].append(row)
                pos[j] += 1
    finally:
        set_threads(2)
        model.cache_type = "f16"
    for j in range(3):
        assert len(got[j]) == len(want[j])
        for step, (a, b) in enumerate(zip(got[j], want[j])):
            assert np.array_equal(a, b), f"sequence {j} step {step}: max diff {np.abs(a - b).max()}"


def test_a_cache_twice_in_one_batch_is_refused(model):
    cache = model.new_cache(8)
    with pytest.raises(ValueError, match="twice"):
        model.forward_batch([([1], cache), ([2], cache)])
    assert cache.length == 0
