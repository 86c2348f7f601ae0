"""Sampler tests against oracles we did not write.

Expected distributions are built with transformers' warpers (TopK/TopP/MinP, RepetitionPenalty)
applied in llama.cpp's chain order (penalties -> top-k -> top-p -> min-p at temperature 1, then
temperature, then softmax), and compared with the empirical frequencies of many seeded draws.
"""

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from edgemoe.errors import UsageError
from edgemoe.sampling import Sampler, SamplingParams, top_logprobs

# 6-token vocabulary; probabilities at T=1 ~ [.03 .38 .06 .16 .24 .13] (distinct, no ties).
LOGITS6 = np.array([-0.9, 1.7, -0.1, 0.8, 1.25, 0.6], dtype=np.float32)
N_DRAWS = 20_000


def oracle_probs(logits, params, history=()):
    """Expected sampling distribution (V,) float64, from transformers' processors."""
    scores = torch.tensor(logits, dtype=torch.float64)[None, :]  # (1, V)
    n = params.repeat_last_n
    recent = list(history) if n == -1 else list(history)[-n:] if n > 0 else []
    if params.repeat_penalty != 1.0 and recent:
        ids = torch.tensor([recent], dtype=torch.long)  # (1, n)
        scores = RepetitionPenaltyLogitsProcessor(params.repeat_penalty)(ids, scores)
    dummy = torch.zeros((1, 1), dtype=torch.long)
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(dummy, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(dummy, scores)
    if params.min_p > 0.0:
        scores = MinPLogitsWarper(params.min_p)(dummy, scores)
    return torch.softmax(scores / params.temperature, dim=-1)[0].numpy()


def draw(params, logits, n, history=()):
    sampler = Sampler(params, len(logits))
    return np.array([sampler.sample(logits, history) for _ in range(n)])


def assert_matches(samples, expected):
    """Every frequency within 5 binomial sigmas; impossible tokens never drawn."""
    counts = np.bincount(samples, minlength=len(expected))
    freq = counts / len(samples)
    sigma = np.sqrt(expected * (1 - expected) / len(samples))
    assert np.all(counts[expected == 0] == 0), (counts, expected)
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-9), (freq, expected)


# --- distributions ------------------------------------------------------------------------------

CASES = {
    # name: (params, how many tokens survive the filters)
    "temperature only": (SamplingParams(1.3, top_k=0, top_p=1.0, min_p=0.0, seed=1), 6),
    "top-k": (SamplingParams(0.7, top_k=3, top_p=1.0, min_p=0.0, seed=2), 3),
    "top-p": (SamplingParams(1.0, top_k=0, top_p=0.75, min_p=0.0, seed=3), 3),
    "min-p": (SamplingParams(1.5, top_k=0, top_p=1.0, min_p=0.3, seed=4), 4),
    # top-k 5 drops token 0; top-p .9 on the renormalised rest keeps 1, 4, 3, 5 (mass .80 before
    # token 5, .94 with it) and drops 2; min-p .35 then drops token 5 (p5 / p_max = .33).
    "chain": (SamplingParams(0.8, top_k=5, top_p=0.9, min_p=0.35, seed=5), 3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_filtered_softmax(name):
    params, n_kept = CASES[name]
    expected = oracle_probs(LOGITS6, params)
    assert np.count_nonzero(expected) == n_kept  # the case exercises the filter it names
    assert_matches(draw(params, LOGITS6, N_DRAWS), expected)


def test_default_params_distribution():
    params = SamplingParams(seed=6)
    logits = np.array([2.0, -3.5, 1.0, 0.2, -1.0, 1.4], dtype=np.float32)
    expected = oracle_probs(logits, params)
    assert np.count_nonzero(expected) == 4  # min-p 0.05 removes tokens 1 and 4
    assert_matches(draw(params, logits, N_DRAWS), expected)


def test_top_p_on_large_unsorted_vocab():
    # top_k=0 with a flat 4k vocabulary: the nucleus holds ~2k tokens, more than the 256-token
    # probe, so the sampler must fall back to a full sort; check support and the tail's mass.
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(4096) * 0.5).astype(np.float32)
    params = SamplingParams(1.0, top_k=0, top_p=0.5, min_p=0.0, seed=7)
    expected = oracle_probs(logits, params)
    support = expected > 0
    assert 256 < support.sum() < 4096
    samples = draw(params, logits, 4000)
    assert support[samples].all()
    tail = np.argsort(-logits)[256:]  # tokens beyond the probe
    in_tail = np.isin(samples, tail).mean()
    p_tail = expected[tail].sum()
    assert abs(in_tail - p_tail) <= 5 * np.sqrt(p_tail * (1 - p_tail) / 4000)


def test_top_p_on_large_peaked_vocab():
    # A peaked 20k vocabulary: the nucleus fits in the probe (no full sort).
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(20_000) * 4.0).astype(np.float32)
    params = SamplingParams(1.0, top_k=0, top_p=0.9, min_p=0.0, seed=8)
    expected = oracle_probs(logits, params)
    assert 1 < np.count_nonzero(expected) < 256
    samples = draw(params, logits, 2000)
    support = np.flatnonzero(expected)
    assert np.isin(samples, support).all()
    assert_matches(np.searchsorted(support, samples), expected[support])


def test_masked_tokens_never_drawn():
    logits = np.array([0.5, -np.inf, 0.1, -np.inf, 0.3, 0.0], dtype=np.float32)
    params = SamplingParams(1.0, top_k=0, top_p=1.0, min_p=0.0, seed=9)
    assert_matches(draw(params, logits, 5000), oracle_probs(logits, params))


# --- repeat penalty -------------------------------------------------------------------------------


def test_repeat_penalty_distribution():
    # Positive logits (1, 4) divided, negative (0, 2) multiplied; token 5 repeated outside the
    # last-4 window is not penalised; repeated occurrences penalise once.
    params = SamplingParams(
        1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.8, repeat_last_n=4, seed=10
    )
    history = [5, 5, 1, 0, 4, 1, 2]
    assert set(history[-4:]) == {0, 1, 2, 4}
    expected = oracle_probs(LOGITS6, params, history)
    unpenalised = oracle_probs(LOGITS6, SamplingParams(1.0, 0, 1.0, 0.0))
    assert expected[5] > unpenalised[5] and expected[1] < unpenalised[1]
    assert_matches(draw(params, LOGITS6, N_DRAWS, history), expected)


@pytest.mark.parametrize(
    "logits, history, penalty, want",
    [
        ([2.0, 1.5, 0.0], [0], 1.5, 1),  # 2.0 / 1.5 = 1.33 < 1.5
        ([2.0, 1.5, 0.0], [0], 1.25, 0),  # 2.0 / 1.25 = 1.6 > 1.5
        ([-1.0, -1.5, -3.0], [0], 2.0, 1),  # -1 * 2 = -2 < -1.5 (dividing would raise it)
        ([1.5, 1.0, 0.0], [1, 1, 1], 0.5, 1),  # penalty < 1 rewards repeats: 1 / 0.5 = 2 > 1.5
    ],
)
def test_repeat_penalty_greedy(logits, history, penalty, want):
    x = np.array(logits, dtype=np.float32)
    params = SamplingParams(temperature=0.0, repeat_penalty=penalty)
    oracle = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([history]), torch.tensor(x)[None, :]
    )
    assert int(oracle.argmax()) == want
    assert Sampler(params, len(x)).sample(x, history) == want


def test_repeat_last_n_window_and_off():
    x = np.array([2.0, 1.9, 0.0], dtype=np.float32)
    history = [0, 2, 2]
    assert (
        Sampler(SamplingParams(0.0, repeat_penalty=2.0, repeat_last_n=3), 3).sample(x, history) == 1
    )
    assert (
        Sampler(SamplingParams(0.0, repeat_penalty=2.0, repeat_last_n=2), 3).sample(x, history) == 0
    )
    assert (
        Sampler(SamplingParams(0.0, repeat_penalty=2.0, repeat_last_n=0), 3).sample(x, history) == 0
    )
    assert (
        Sampler(SamplingParams(0.0, repeat_penalty=2.0, repeat_last_n=-1), 3).sample(x, history)
        == 1
    )


# --- greedy, determinism, hygiene -----------------------------------------------------------------


def test_greedy_is_argmax():
    rng = np.random.default_rng(2)
    sampler = Sampler(SamplingParams(temperature=0.0), 32_000)
    for _ in range(20):
        x = rng.standard_normal(32_000).astype(np.float32)
        assert sampler.sample(x, [int(i) for i in rng.integers(0, 32_000, 10)]) == int(
            torch.argmax(torch.from_numpy(x))
        )


def test_greedy_ties_pick_lowest_id():
    x = np.array([0.1, 3.0, -1.0, 3.0, 3.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0), 5).sample(x, []) == 1


def test_seeded_runs_reproducible():
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal(1000).astype(np.float32) for _ in range(50)]
    params = SamplingParams(temperature=1.0, top_k=100, top_p=0.99, min_p=0.0, seed=1234)

    def run(sampler):
        return [sampler.sample(x, []) for x in logits]

    a = Sampler(params, 1000)
    first = run(a)
    assert run(Sampler(params, 1000)) == first
    a.reset()
    assert run(a) == first
    other = run(Sampler(SamplingParams(1.0, 100, 0.99, 0.0, seed=4321), 1000))
    assert other != first


def test_logits_not_modified():
    x = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    before = x.copy()
    s = Sampler(SamplingParams(1.0, top_k=2, top_p=0.9, min_p=0.1, repeat_penalty=1.3, seed=0), 4)
    for _ in range(10):
        s.sample(x, [3, 1, 0])
    np.testing.assert_array_equal(x, before)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        Sampler(SamplingParams(), 10).sample(np.zeros(11, np.float32), [])


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("temperature", -0.1, "--temp"),
        ("temperature", float("nan"), "--temp"),
        ("top_k", -1, "--top-k"),
        ("top_p", 0.0, "--top-p"),
        ("top_p", 1.5, "--top-p"),
        ("min_p", -0.1, "--min-p"),
        ("min_p", 1.0, "--min-p"),
        ("repeat_penalty", 0.0, "--repeat-penalty"),
        ("repeat_penalty", -1.0, "--repeat-penalty"),
        ("repeat_last_n", -2, "--repeat-last-n"),
        ("seed", -5, "--seed"),
    ],
)
def test_validate_rejects(field, value, flag):
    params = SamplingParams(**{field: value})
    with pytest.raises(UsageError, match=flag) as e:
        params.validate()
    assert str(value) in str(e.value)
    with pytest.raises(UsageError):
        Sampler(params, 10)


def test_validate_message_format():
    with pytest.raises(UsageError, match=r"^--top-p must be in \(0, 1\], got 1\.5$"):
        SamplingParams(top_p=1.5).validate()


def test_validate_accepts_edges():
    for p in (SamplingParams(), SamplingParams(0.0, 0, 1.0, 0.0, 1.0, 0, 0)):
        assert p.validate() is p


# --- top_logprobs ---------------------------------------------------------------------------------


def test_top_logprobs_matches_log_softmax():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(5000) * 3).astype(np.float32)
    ref = torch.log_softmax(torch.from_numpy(x).double(), dim=-1)
    vals, ids = torch.topk(ref, 5)
    got = top_logprobs(x, 5)
    assert [i for i, _ in got] == ids.tolist()
    np.testing.assert_allclose([lp for _, lp in got], vals.numpy(), rtol=0, atol=1e-12)


def test_top_logprobs_edges():
    x = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    ref = torch.log_softmax(torch.tensor(x).double(), dim=-1).numpy()
    got = top_logprobs(x, 10)  # k > V -> all, ties by lower id
    assert [i for i, _ in got] == [1, 2, 0]
    np.testing.assert_allclose([lp for _, lp in got], ref[[1, 2, 0]], atol=1e-12)
    assert top_logprobs(x, 0) == []
