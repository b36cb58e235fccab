"""The fast host sampler (toolchain.decoder.sample) against the plain definition (sample_reference): for fresh random
logits of Qwen's vocabulary size and every parameter mix, the same seed draws the same token (the two differ only
where float sums in another order move a boundary, so nearly always), and its draws follow the exact distribution."""
from __future__ import annotations

import numpy as np
import pytest

from toolchain.decoder import Sampling, sample, sample_reference

MIXES = [Sampling(0.7, 0, 0.9), Sampling(1.0), Sampling(0.8, 40, 0.95), Sampling(1.5, 0, 0.5), Sampling(2.0, 5),
         Sampling(0.3), Sampling(1.2, 1000), Sampling(5.0, 0, 0.99)]


@pytest.mark.parametrize("s", MIXES)
def test_same_token_as_the_reference(s):
    rng = np.random.default_rng()
    same = 0
    for _ in range(60):
        logits = (rng.standard_normal(151936) * rng.uniform(0.5, 8)).astype(np.float32)
        logits[rng.integers(0, 151936, 3)] += rng.uniform(0, 12)  # a few peaked tokens, as language models have
        seed = int(rng.integers(1 << 31))
        same += sample(logits, s, np.random.default_rng(seed)) == sample_reference(logits, s, np.random.default_rng(seed))
    assert same >= 59


def test_draws_follow_the_exact_distribution():
    """Chi-square of 20,000 draws over a small vocabulary against the probabilities the definition gives."""
    rng = np.random.default_rng()
    logits = rng.standard_normal(50).astype(np.float32) * 2
    s = Sampling(0.9, 0, 0.8)
    z = np.sort(logits.astype(np.float64) / s.temperature)[::-1]
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), s.top_p) + 1)
    want = np.zeros(50)
    want[order[:keep]] = p[:keep] / p[:keep].sum()
    draws = np.bincount([sample(logits, s, rng) for _ in range(20000)], minlength=50)
    assert draws[want == 0].sum() == 0
    expected = want[want > 0] * 20000
    chi2 = float(((draws[want > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 3 * keep + 30, (chi2, keep)  # far above the mean (keep - 1); a wrong sampler is far above this


def _penalized_by_hand(logits, history, s):
    """llama.cpp's penalty loop, written out token by token (an independent statement of apply_penalties)."""
    out = [float(x) for x in logits]
    window = list(history)[-64:]
    for t in set(window):
        c = window.count(t)
        z = out[t]
        if s.repetition_penalty != 1:
            z = z / s.repetition_penalty if z > 0 else z * s.repetition_penalty
        out[t] = z - c * s.frequency_penalty - (s.presence_penalty if c > 0 else 0.0)
    return np.array(out)


def test_penalties_are_llama_cpps_formula_over_the_last_64_tokens():
    from toolchain.sampling import apply_penalties

    rng = np.random.default_rng()
    logits = rng.standard_normal(500).astype(np.float32) * 3
    history = list(map(int, rng.integers(0, 500, 200)))
    history[-20:] = [7] * 20  # a token repeated inside the window; history[:136] lies outside it
    s = Sampling(0.8, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25)
    got = apply_penalties(logits, history, s)
    np.testing.assert_allclose(got, _penalized_by_hand(logits, history, s), rtol=1e-6, atol=1e-5)
    outside = set(history[:136]) - set(history[-64:])
    for t in outside:
        assert got[t] == logits[t]
    assert apply_penalties(logits, history, Sampling(0.8)) is logits


PENALTY_AND_MIN_P_MIXES = [Sampling(0.7, 0, 0.9, min_p=0.05), Sampling(1.0, min_p=0.1), Sampling(1.3, min_p=1e-4),
                           Sampling(0.8, 40, 0.95, repetition_penalty=1.2, frequency_penalty=0.3),
                           Sampling(0.0, repetition_penalty=2.0, presence_penalty=1.0)]


@pytest.mark.parametrize("s", PENALTY_AND_MIN_P_MIXES, ids=str)
def test_min_p_and_penalties_same_token_as_the_reference(s):
    rng = np.random.default_rng()
    same = 0
    for _ in range(40):
        logits = (rng.standard_normal(151936) * rng.uniform(0.5, 8)).astype(np.float32)
        top = rng.integers(0, 151936, 3)
        logits[top] += rng.uniform(0, 12)
        history = list(map(int, rng.integers(0, 151936, 100))) + list(map(int, top))
        seed, pos = int(rng.integers(1 << 62)), int(rng.integers(0, 8000))
        from toolchain.sampling import draw_rng

        same += sample(logits, s, draw_rng(seed, pos), history) == sample_reference(logits, s, draw_rng(seed, pos),
                                                                                   history)
    assert same >= 39


def test_min_p_keeps_only_tokens_near_the_top():
    rng = np.random.default_rng()
    logits = rng.standard_normal(2000).astype(np.float32) * 3
    s = Sampling(1.0, min_p=0.2)
    x = np.exp(logits.astype(np.float64) - logits.max())
    allowed = set(np.flatnonzero(x >= 0.2).tolist())
    assert {sample(logits, s, rng) for _ in range(300)} <= allowed


def test_uniform_is_philox_of_seed_and_position():
    """The same (seed, position) gives the same uniform whatever was drawn before; another position another one."""
    from toolchain.sampling import uniform

    a = [uniform(5, p) for p in range(100)]
    assert a == [uniform(5, p) for p in range(100)] and len(set(a)) == 100
    assert uniform(6, 3) != uniform(5, 3)
    assert all(0 <= u < 1 for u in a)


def test_device_parameter_words_and_the_kernel_constants():
    """device_params packs what plugins/sampling.cu reads at those word offsets; the kernel's constants are the
    Python ones (window, words, the register budget that bounds the vocabulary)."""
    import re

    from toolchain import kernels
    from toolchain.sampling import PARAM_WORDS, PENALTY_WINDOW, device_params

    w = device_params(Sampling(0.7, 40, 0.9, 2**40 + 3, 0.05, 1.1, 0.2, -0.3), 2**40 + 3)
    f = w.view(np.float32)
    assert np.allclose([f[0], f[2], f[3], f[4], f[5], f[6]], [0.7, 0.9, 0.05, 1.1, 0.2, -0.3]) and w[1] == 40
    assert w[7] == 1 and int(w[8:10].view(np.uint32)[0]) == 3 and int(w[8:10].view(np.uint32)[1]) == 2**8
    assert device_params(Sampling(0.7), 1)[7] == 0
    src = (kernels.PLUGINS / "sampling.cu").read_text()
    consts = dict(re.findall(r"(\w+) = (\d+)", re.search(r"constexpr int ([^;]+);", src).group(0)))
    assert int(consts["HIST"]) == PENALTY_WINDOW == kernels.PENALTY_THREADS
    assert int(consts["WORDS"]) == PARAM_WORDS
    assert (int(consts["SPLITS"]), int(consts["THREADS"]), int(consts["PER"])) == (
        kernels.SAMPLE_SPLITS, kernels.SAMPLE_THREADS, kernels.SAMPLE_PER)
    assert kernels.SAMPLE_MAX_VOCAB >= 151936


def test_bad_sampling_settings_are_one_line_errors():
    from toolchain.errors import UserError

    for kw in ({"min_p": 1.5}, {"repetition_penalty": 0}, {"presence_penalty": 3}, {"frequency_penalty": -2.5},
               {"seed": -1}):
        with pytest.raises(UserError):
            Sampling(0.7, **kw)
