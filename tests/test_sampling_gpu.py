"""The device sampler (plugins/sampling.cu through toolchain/device_sampler.py) against the numpy definition
(toolchain/sampling.py): fresh random logits of Qwen's vocabulary, each parameter mix, many seeds and positions.

- With top-k / top-p the device sorts its candidates as the reference does and draws with the same uniform (Philox
  of seed and position, numpy's generator): the same token as sample_reference nearly always (a boundary can move
  only where float sums in another order cross it), which also proves the device Philox equals numpy's. Where more
  than 2,048 tokens are kept, the device sorts only the cut's neighbourhood and draws in index order: its token is
  then one of the reference's kept set (the set is exact; the order of the draw differs).
- Without them (temperature, min-p) it draws in another order: a chi-square of many draws against the reference
  probabilities, at a significance a wrong sampler fails.
- Greedy rows are the argmax bit for bit (of the penalized logits where penalties are set); a row's token depends
  only on its logits, slot settings, seed and position, not on the other rows of the batch; NaN logits fall back to
  the argmax; the penalty ring gets every drawn token. Skips without a GPU."""
from __future__ import annotations

import numpy as np
import pytest

from toolchain.sampling import (MAX_LOGPROBS, PENALTY_WINDOW, Sampling, Tail, apply_penalties, draw_rng,
                                history_window, kept_tokens, sample_reference, token_logprobs)

pytestmark = pytest.mark.gpu
VOCAB = 151936
ROWS = 8


class Harness:
    """The launches of a sampled step's tail (penalties, the draw with its own argmax, logprobs; the argmax kernel
    where there is no draw) over logits the test uploads."""

    def __init__(self):
        from toolchain import cuda_runtime as cr
        from toolchain.device_sampler import DeviceSampler
        from toolchain.kernels import launch_config

        cr.init()
        self.cr, self.stream = cr, cr.Stream()
        self.sampler = DeviceSampler(VOCAB, ROWS, ROWS)
        self.logits = cr.DeviceBuffer.zeros((ROWS, VOCAB), np.float32)
        self.next_token = cr.DeviceBuffer.zeros((ROWS,), np.int64)
        self.slots = cr.DeviceBuffer.zeros((ROWS,), np.int32)
        self.positions = cr.DeviceBuffer.zeros((ROWS,), np.int32)
        self.argmax = cr.load_op("argmax", {})
        self.launch_config = launch_config

    def run(self, logits, settings, positions, rows=None, histories=None, tail=Tail()):
        """Sample rows (default all) of `logits` [m, VOCAB]; settings: (Sampling, seed) per row, row r in slot r;
        `tail`: the sampler's passes (with logprobs: read them with logprobs())."""
        m = len(logits)
        rows = list(range(m)) if rows is None else rows
        for r in range(m):
            s, seed = settings[r]
            hist = histories[r] if histories is not None else [0] * (positions[r] + 1)
            self.sampler.set_slot(r, s, seed, hist, positions[r], self.stream)
        self.logits.upload(np.ascontiguousarray(logits, np.float32), self.stream)
        self.slots.upload(np.arange(m, dtype=np.int32), self.stream)
        self.positions.upload(np.asarray(positions, np.int32), self.stream)
        self.next_token.fill_u8(0xFF, self.stream)  # poisoned: every sampled row must be written
        self.sampler.set_rows(rows, self.stream)
        before, after = self.sampler.launches(len(rows), self.logits.ptr, self.next_token.ptr, self.slots.ptr,
                                              self.positions.ptr, tail)
        cfg = self.launch_config("argmax", {"m": m, "vocab": VOCAB})
        for x in before:
            x[2].launch(x[3], x[4], self.stream)
        if not tail.draw:  # as in the step's plan: the draw takes the argmax itself
            self.argmax.launch(cfg, [self.logits.ptr, *cfg.scalars, self.next_token.ptr], self.stream)
        for x in after:
            x[2].launch(x[3], x[4], self.stream)
        toks = self.next_token.download(self.stream, rows=m).reshape(-1)
        return toks[rows]

    def logprobs(self, tokens, tops):
        return self.sampler.read_logprobs(tokens, tops, self.stream)

    def penalized_logits(self, m):
        return self.logits.download(self.stream, rows=m)

    def ring(self, slot):
        return self.sampler.history.download(self.stream).reshape(-1, PENALTY_WINDOW)[slot]


@pytest.fixture(scope="module")
def harness():
    return Harness()


def lm_logits(rng, n=ROWS):
    """Logits shaped like a language model's: a broad body and a few peaked tokens."""
    x = (rng.standard_normal((n, VOCAB)) * rng.uniform(1, 4, (n, 1))).astype(np.float32)
    for r in range(n):
        x[r, rng.integers(0, VOCAB, 6)] += rng.uniform(4, 14, 6).astype(np.float32)
    return x


SORTED_MIXES = [Sampling(0.7, 0, 0.9), Sampling(0.8, 40, 0.95), Sampling(1.0, 50), Sampling(1.5, 0, 0.5),
                Sampling(0.7, 0, 0.9, min_p=0.05), Sampling(1.2, 1000), Sampling(0.9, 20, 0.8, repetition_penalty=1.3,
                                                                                  presence_penalty=0.5,
                                                                                  frequency_penalty=0.2)]


@pytest.mark.parametrize("s", SORTED_MIXES, ids=str)
def test_top_k_top_p_draw_the_reference_token(harness, s):
    rng = np.random.default_rng()
    same = total = wide = 0
    for _ in range(6):
        logits = lm_logits(rng)
        seeds = [int(x) for x in rng.integers(0, 2**63, ROWS)]
        positions = [int(x) for x in rng.integers(64, 4000, ROWS)]
        hists = [list(map(int, rng.integers(0, VOCAB, p + 1))) for p in positions]
        for r in range(ROWS):  # make the penalized tokens matter: some of the history is the peaked tokens
            hists[r][-5:] = [int(t) for t in np.argsort(logits[r])[-5:]]
        got = harness.run(logits, [(s, sd) for sd in seeds], positions, histories=hists)
        for r in range(ROWS):
            assert harness.ring(r)[(positions[r] + 1) % PENALTY_WINDOW] == got[r]
            order, _ = kept_tokens(logits[r], s, hists[r])
            if len(order) > 1500:  # drawn in index order from the exact set (a token at the edge may move by one)
                edge = kept_tokens(logits[r], Sampling(s.temperature, len(order) + 2), hists[r])[0]
                assert int(got[r]) in set(edge.tolist()), (len(order), int(got[r]))
                wide += 1
                continue
            want = sample_reference(logits[r], s, draw_rng(seeds[r], positions[r]), hists[r])
            same += int(got[r]) == want
            total += 1
    assert same >= total - 1, (same, total, wide)


def test_top_p_within_top_k_is_normalized_by_the_whole_top_k_set(harness):
    """With top-k and top-p together, top-p's threshold is top_p x the mass of the top-k set (the reference's order:
    top-k, then top-p among those). A row where top_p x the whole vocabulary's mass is reached before the k-th token:
    a kernel that gathered only up to there would normalize by too small a mass and never draw token 3 (the
    reference keeps 4 tokens and draws token 3 about a quarter of the time). Same token as the reference per draw."""
    z = np.full(VOCAB, -100.0, np.float32)
    z[0], z[1:6], z[6:206] = 10.0, 10.0 + np.log(0.9), 10.0 + np.log(0.01)
    s = Sampling(1.0, 40, 0.5)
    assert len(kept_tokens(z, s)[0]) == 4
    rng = np.random.default_rng()
    logits = np.repeat(z[None], ROWS, 0)
    same = total = 0
    drawn = set()
    for k in range(40):
        seeds = [int(x) for x in rng.integers(0, 2**63, ROWS)]
        got = harness.run(logits, [(s, sd) for sd in seeds], [k] * ROWS)
        for r in range(ROWS):
            same += int(got[r]) == sample_reference(z, s, draw_rng(seeds[r], k))
            total += 1
            drawn.add(int(got[r]))
    assert same >= total - 1 and 3 in drawn, (same, total, sorted(drawn))


@pytest.mark.parametrize("s", [Sampling(0.7, 0, 0.9), Sampling(0.7, 40, 0.9, min_p=0.05), Sampling(1.2, 1)],
                         ids=str)
def test_a_row_whose_argmax_reaches_top_p_around_the_boundary(harness, s):
    """The kernel's shortcut for peaked rows (the argmax's probability reaches top_p, or top-k 1: the argmax alone,
    decided before any histogram) against the reference on both sides of top_p: the argmax's probability at
    0.99, 1 + 5e-5 (inside the shortcut's margin: the full path decides), 1.001 and 1.05 times top_p, a second
    token that the nucleus keeps below the boundary, a random body, the two tokens anywhere in the row. The same
    token as the reference per draw; below the boundary the second token is drawn too (a shortcut taken there
    would never draw it)."""
    rng = np.random.default_rng()
    top_p = s.top_p if s.top_p < 1 else 0.9
    for ratio in (0.99, 1 + 5e-5, 1.001, 1.05):
        logits = np.empty((ROWS, VOCAB), np.float32)
        for r in range(ROWS):
            w = np.exp(rng.standard_normal(VOCAB) * 0.3)
            w *= 0.04 / w.sum()  # the body's mass, relative to the argmax's 1
            a, b = rng.choice(VOCAB, 2, replace=False)
            w[a] = 1.0
            w[b] = 0.0
            w[b] = 1 / (ratio * top_p) - w.sum()  # the argmax's probability: ratio x top_p
            logits[r] = (np.log(w) * s.temperature).astype(np.float32)
        same = total = other = 0
        for k in range(25):
            seeds = [int(x) for x in rng.integers(0, 2**63, ROWS)]
            got = harness.run(logits, [(s, sd) for sd in seeds], [k] * ROWS)
            for r in range(ROWS):
                same += int(got[r]) == sample_reference(logits[r], s, draw_rng(seeds[r], k))
                other += int(got[r]) != int(np.argmax(logits[r]))
                total += 1
        assert same >= total - 1, (ratio, same, total)
        if len(kept_tokens(logits[0], s)[0]) > 1:  # (with top-k 40, its set's mass normalizes: one token kept)
            assert other > 0, ratio


def test_wide_nucleus_keeps_exactly_the_reference_set(harness):
    """Top-p over a broad body (thousands of kept tokens, the device's edge mode): every draw is in the reference's
    kept set, and over many draws the drawn tokens' mass matches the set's (a coarse edge would leak past it)."""
    rng = np.random.default_rng()
    row = (rng.standard_normal(VOCAB) * 1.3).astype(np.float32)  # ~5,000 kept, ~200 in the cut's bin
    s = Sampling(1.0, 0, 0.3)
    order, p = kept_tokens(row, s)
    assert 2048 < len(order) < 40000
    kept = set(order.tolist())
    outside = set(kept_tokens(row, Sampling(1.0, 0, 0.31))[0].tolist()) - kept
    logits = np.repeat(row[None], ROWS, 0)
    hits = 0
    for k in range(200):
        toks = harness.run(logits, [(s, int(x)) for x in rng.integers(0, 2**63, ROWS)], [k] * ROWS)
        for t in toks:
            hits += int(t) in outside
            assert int(t) in kept or int(t) in outside, int(t)
    assert hits <= 2, hits  # tokens just past the edge: at most a rounding's worth


@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.6), Sampling(1.3, min_p=0.02)], ids=str)
def test_temperature_and_min_p_follow_the_distribution(harness, s):
    """Chi-square over the 40 most likely tokens and the rest, 16,000 draws of one row's logits."""
    rng = np.random.default_rng()
    row = (rng.standard_normal(VOCAB) * 1.5).astype(np.float32)
    row[rng.integers(0, VOCAB, 30)] += rng.uniform(6, 14, 30).astype(np.float32)
    z = row.astype(np.float64) / s.temperature
    p = np.exp(z - z.max())
    if s.min_p:
        p[p < s.min_p] = 0
    p /= p.sum()
    top = np.argsort(-p)[:40]
    want = np.append(p[top], 1 - p[top].sum())
    counts = np.zeros(41)
    index = {int(t): i for i, t in enumerate(top)}
    logits = np.repeat(row[None], ROWS, 0)
    for k in range(2000):
        seeds = [int(x) for x in rng.integers(0, 2**63, ROWS)]
        toks = harness.run(logits, [(s, sd) for sd in seeds], [k % 4000] * ROWS)
        for t in toks:
            assert p[int(t)] > 0, int(t)  # never a token min-p removed
            counts[index.get(int(t), 40)] += 1
    n = counts.sum()
    ok = want * n >= 5
    expected = want[ok] * n
    rest = counts[~ok].sum(), want[~ok].sum() * n
    chi2 = float(((counts[ok] - expected) ** 2 / expected).sum())
    if rest[1] > 0:
        chi2 += (rest[0] - rest[1]) ** 2 / max(rest[1], 1)
    dof = int(ok.sum())
    assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, (chi2, dof)  # mean dof; a wrong sampler is far above


def test_greedy_rows_are_the_argmax_and_rows_do_not_depend_on_the_batch(harness):
    rng = np.random.default_rng()
    logits = lm_logits(rng)
    pen = Sampling(0.0, repetition_penalty=1.5, frequency_penalty=0.5)
    hot = Sampling(0.8, 0, 0.9)
    settings = [(Sampling(), 1), (pen, 2), (hot, 3), (hot, 4), (Sampling(), 5), (hot, 6), (pen, 7), (hot, 8)]
    positions = [int(x) for x in rng.integers(100, 3000, ROWS)]
    hists = []
    for r in range(ROWS):  # the most likely tokens were just seen: the penalties move the argmax
        h = list(map(int, rng.integers(0, VOCAB, positions[r] + 1)))
        h[-10:] = [int(t) for t in np.argsort(logits[r])[-10:]]
        hists.append(h)
    got = harness.run(logits, settings, positions, histories=hists)
    for r, (s, seed) in enumerate(settings):
        if s.greedy:
            assert got[r] == sample_reference(logits[r], s, draw_rng(seed, positions[r]), hists[r])
    # each row alone (a batch of one, the row in slot 0) gives the same token
    for r in range(ROWS):
        alone = harness.run(logits[r:r + 1], [settings[r]], [positions[r]], histories=[hists[r]])
        assert alone[0] == got[r], r
    # only some rows sampled: the others keep the argmax the step wrote
    some = harness.run(logits, settings, positions, rows=[2, 5], histories=hists)
    assert list(some) == [got[2], got[5]]


def test_nan_logits_fall_back_to_the_argmax(harness):
    rng = np.random.default_rng()
    logits = lm_logits(rng)
    logits[1, :] = np.nan
    logits[3, 17] = np.nan  # the argmax takes the first NaN: nothing else can be drawn
    got = harness.run(logits, [(Sampling(0.8, 0, 0.9), 1)] * 4 + [(Sampling(1.0), 2)] * 4, [10] * ROWS)
    assert got[1] == 0 and got[3] == 17
    assert all(0 <= int(t) < VOCAB for t in got)


def test_a_huge_top_k_over_flat_logits_keeps_the_coarse_edge(harness):
    """More than the kernel's 2,048 tokens share the cut's bin: the documented coarse edge, every token of that bin
    (probability within a factor 2^(1/64) of the k-th token's) may be drawn, none below it."""
    rng = np.random.default_rng()
    logits = (rng.standard_normal((ROWS, VOCAB)) * 0.01).astype(np.float32)
    got = harness.run(logits, [(Sampling(1.0, 5000), int(k)) for k in range(ROWS)], [5] * ROWS)
    for r in range(ROWS):
        kth = np.sort(logits[r])[::-1][4999]
        assert logits[r, int(got[r])] >= kth - np.log(2) / 64 - 1e-6, (r, int(got[r]))


def test_penalty_ring_of_a_prompt(harness):
    toks = list(range(1000, 1100))
    ring = history_window(toks, 99)
    assert sorted(ring.tolist()) == list(range(1036, 1100))


def _check_records(got, z, token, top, tol=1e-4):
    """A device record against token_logprobs over logits z (float64): the token's logprob, and at each rank the
    reference's value, by a token whose own reference logprob is that value (near-equal logits may swap)."""
    want = token_logprobs(z, token, top)
    zd = np.asarray(z, np.float64)
    lse = zd.max() + np.log(np.exp(zd - zd.max()).sum())
    assert got["token"] == want["token"] == token
    assert abs(got["logprob"] - want["logprob"]) < tol, (got["logprob"], want["logprob"])
    assert len(got["top"]) == len(want["top"]) == top
    assert len({i for i, _ in got["top"]}) == top  # distinct tokens
    for rank, ((i, v), (_, w)) in enumerate(zip(got["top"], want["top"])):
        assert abs(v - w) < tol and abs((zd[i] - lse) - w) < tol, (rank, i, v, w)


@pytest.mark.parametrize("s", [Sampling(), Sampling(0.7, 0, 0.9), Sampling(0.9, 20, 0.8, repetition_penalty=1.3,
                                                                           presence_penalty=0.5)], ids=str)
def test_device_logprobs_are_the_reference_log_softmax(harness, s):
    """token_logprobs (the pass after the draw) against sampling.token_logprobs in float64 on the same logits after
    the same penalties: the drawn token's logprob and the 20 most likely (ids and values), fresh logits per row,
    greedy, sampled and penalized rows, some rows of a batch only."""
    assert MAX_LOGPROBS == 20
    rng = np.random.default_rng()
    for trial in range(3):
        logits = lm_logits(rng)
        positions = [int(x) for x in rng.integers(64, 4000, ROWS)]
        hists = [list(map(int, rng.integers(0, VOCAB, p + 1))) for p in positions]
        for r in range(ROWS):
            hists[r][-5:] = [int(t) for t in np.argsort(logits[r])[-5:]]
        rows = list(range(ROWS)) if trial != 1 else [1, 4, 6]
        tops = [int(x) for x in rng.integers(0, MAX_LOGPROBS + 1, len(rows))]
        got_t = harness.run(logits, [(s, int(x)) for x in rng.integers(0, 2**63, ROWS)], positions, rows=rows,
                            histories=hists, tail=Tail(penalties=s.penalized, logprobs=True))
        recs = harness.logprobs([int(t) for t in got_t], tops)
        for k, r in enumerate(rows):
            _check_records(recs[k], apply_penalties(logits[r], hists[r], s), int(got_t[k]), tops[k])


def test_device_logprobs_of_near_flat_logits_stay_within_their_bin(harness):
    """More tokens than the gather holds share the cut's bin (near-flat logits): the listed logprobs are within the
    documented 1/16 nat of the true top 20, the drawn token's logprob exact."""
    rng = np.random.default_rng()
    logits = (rng.standard_normal((ROWS, VOCAB)) * 0.001).astype(np.float32)
    toks = harness.run(logits, [(Sampling(), 1)] * ROWS, [3] * ROWS, tail=Tail(False, False, True))
    recs = harness.logprobs([int(t) for t in toks], [20] * ROWS)
    for r in range(ROWS):
        want = token_logprobs(logits[r], int(toks[r]), 20)
        assert abs(recs[r]["logprob"] - want["logprob"]) < 1e-4
        assert len(recs[r]["top"]) == 20
        for (_, v), (_, w) in zip(recs[r]["top"], want["top"]):
            assert w - 1 / 16 - 1e-4 <= v <= w + 1e-4, (v, w)
