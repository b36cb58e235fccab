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
