"""The prompt-prefill pair (rope_kv_append + prefill_attention) against the rope_kv_attention contract
(toolchain/ops.py): fresh random inputs, a cache already holding earlier positions, a slot other than 0, the
output poisoned with NaN. Needs a GPU."""
import numpy as np
import pytest

from toolchain import cuda_runtime as cr
from toolchain import kernels as K
from toolchain import ops
from conftest import xh_layout

pytestmark = pytest.mark.gpu
SHAPES = {"1.5B": dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6),
          "0.5B": dict(n_heads=14, n_kv_heads=2, head_dim=64, rope_theta=1e6),
          "3B": dict(n_heads=16, n_kv_heads=2, head_dim=128, rope_theta=1e6),  # 8 query heads per kv head
          "7B": dict(n_heads=28, n_kv_heads=4, head_dim=128, rope_theta=1e6)}


def _run_pair(a, q, k, v, kc, vc, pos, slots, splits=1, extra=None):
    """rope_kv_append then prefill_attention with grid z = splits (extra: defines of the attention's build; with
    XH_OUT its fp16 copy of `out` is appended to what is returned).
    Returns (out, k cache, v cache, the split counters after the launch[, xh])."""
    m, n_slots, max_seq = len(pos), kc.shape[0], kc.shape[2]
    defines = K.defines_for("prefill_attention", a)
    dims = dict(a, m=m, n_slots=n_slots, max_seq=max_seq, pa_splits=splits)
    bq, bk, bv, bkc, bvc, bpos, bslots = (cr.DeviceBuffer.from_numpy(x) for x in (q, k, v, kc, vc, pos, slots))
    q_rot = cr.DeviceBuffer.zeros(q.shape, np.float32)
    out = cr.DeviceBuffer.zeros(q.shape, np.float32)
    out.fill_u32(0x7FC00000)
    n_part, n_count = K.prefill_attention_scratch(m, a["n_heads"], a["n_kv_heads"], a["head_dim"], splits)
    part = cr.DeviceBuffer.zeros((n_part,), np.float32)
    part.fill_u32(0x7FC00000)  # slots the merge reads must have been written by this launch
    count = cr.DeviceBuffer.zeros((n_count,), np.int32)
    c1 = K.launch_config("rope_kv_append", dims)
    cr.load_op("rope_kv_append", defines).launch(c1, [bq, bk, bv, bpos, bslots, *c1.scalars, q_rot, bkc, bvc])
    c2 = K.launch_config("prefill_attention", dims)
    xh = [cr.DeviceBuffer(q.size * 2)] if (extra or {}).get("XH_OUT") else []
    for b in xh:
        b.fill_u8(0xFF)
    cr.load_op("prefill_attention", defines | (extra or {})).launch(
        c2, [q_rot, bkc, bvc, bpos, bslots, *c2.scalars, out, part, count, *xh])
    cr.synchronize()
    return (out.download(q.shape, np.float32), bkc.download(kc.shape, np.float16),
            bvc.download(vc.shape, np.float16), count.download((n_count,), np.int32),
            *[b.download(q.shape, np.float16) for b in xh])


def _inputs(a, start, m, rng):
    H, KV, D = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    n_slots, max_seq, slot = 2, start + m + 8, 1
    q = rng.standard_normal((m, H * D)).astype(np.float32)
    k = rng.standard_normal((m, KV * D)).astype(np.float32)
    v = rng.standard_normal((m, KV * D)).astype(np.float32)
    kc = (rng.standard_normal((n_slots, KV, max_seq, D)) * 0.5).astype(np.float16)
    vc = (rng.standard_normal((n_slots, KV, max_seq, D)) * 0.5).astype(np.float16)
    pos = np.arange(start, start + m, dtype=np.int32)
    return q, k, v, kc, vc, pos, np.full(m, slot, np.int32)


# rows are (token, q head) pairs packed 64 to a block and keys come in tiles of 32: m = 1, odd m and tile edges, a
# prompt piece deep into the cache; one split (grid z = 1) and the default's, which splits the deep pieces' keys
@pytest.mark.parametrize("splits", [1, K.PREFILL_KV_SPLITS])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("start,m", [(0, 100), (37, 64), (300, 33), (0, 1), (31, 17), (2990, 512), (5000, 40)])
def test_prefill_pair_matches_contract(shape, start, m, splits):
    a = SHAPES[shape]
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    rng = np.random.default_rng(seed)
    q, k, v, kc, vc, pos, slots = _inputs(a, start, m, rng)
    want, kc_ref, vc_ref = ops.rope_kv_attention(q, k, v, kc.copy(), vc.copy(), pos, slots, n_heads=a["n_heads"],
                                                 n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                                                 rope_theta=a["rope_theta"])
    got, got_kc, got_vc, count = _run_pair(a, q, k, v, kc, vc, pos, slots, splits)
    assert np.isfinite(got).all(), f"unwritten or non-finite output (seed={seed})"
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err < 2e-3, f"rel err {err:.2e} (seed={seed})"
    assert np.array_equal(got_vc, vc_ref), f"v cache (seed={seed})"
    assert np.abs(got_kc.astype(np.float32) - kc_ref.astype(np.float32)).max() < 2e-2, f"k cache (seed={seed})"
    assert np.array_equal(got_kc[0], kc[0]), "slot 0 must be untouched"
    assert not count.any(), "the split counters must be back at 0 for the next launch"
    print(f"{shape} start={start} m={m} splits={splits}: rel err {err:.2e}")


# many splits of few tiles (positions 250-346: 9-11 tiles per row block; 600-696: 19-22): empty splits (9 tiles in
# 4 splits of 3 leave the 4th none), one tile per split, splits clamped by PA_MAX_SPLITS (16) below the grid's 24,
# rows whose whole split lies past their position; each run twice for determinism
@pytest.mark.parametrize("grid,tiles,start", [(4, 2, 250), (16, 1, 250), (24, 1, 600), (3, 4, 600)])
def test_prefill_split_keys(grid, tiles, start):
    a = SHAPES["1.5B"]
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    rng = np.random.default_rng(seed)
    q, k, v, kc, vc, pos, slots = _inputs(a, start, 97, rng)
    want, _, _ = ops.rope_kv_attention(q, k, v, kc.copy(), vc.copy(), pos, slots, n_heads=a["n_heads"],
                                       n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"], rope_theta=a["rope_theta"])
    extra = {"PA_SPLIT_TILES": tiles}
    got, _, _, count = _run_pair(a, q, k, v, kc, vc, pos, slots, grid, extra)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert np.isfinite(got).all() and err < 2e-3, f"rel err {err:.2e} (seed={seed})"
    assert not count.any(), "the split counters must be back at 0"
    again, *_ = _run_pair(a, q, k, v, kc, vc, pos, slots, grid, extra)
    assert np.array_equal(got, again), f"not deterministic (seed={seed})"


def test_shallow_rows_keep_the_unsplit_bits():
    """A piece of 512 tokens from position 0: every row block has at most 16 tiles, so the default grid's z
    blocks beyond the first return and the output is the one-split kernel's, bit for bit."""
    a = SHAPES["1.5B"]
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % (1 << 31)))
    args = _inputs(a, 0, 512, rng)
    one, *_ = _run_pair(a, *args, splits=1)
    deep, *_ = _run_pair(a, *args, splits=K.PREFILL_KV_SPLITS)
    assert np.array_equal(one, deep)


# m = 37: 222 rows, so the last row block's warps hold valid and masked rows side by side (the pairs' shuffles)
@pytest.mark.parametrize("start,m,splits", [(0, 100, 1), (0, 37, 1), (2990, 100, K.PREFILL_KV_SPLITS),
                                            (2990, 37, K.PREFILL_KV_SPLITS)])
def test_prefill_attention_writes_the_gemm_fp16_input(start, m, splits):
    """Built with XH_OUT=1 (the cuda backend's xh_by_producer), the attention writes `out` bit for bit as the plain
    build does, and beside it the o projection's fp16 input: per 16-element chunk the even elements then the odd ones
    (plugins/xh_store.cuh), rounded as numpy rounds; on the unsplit path (lane pairs' words) and the split merge
    (float4)."""
    a = SHAPES["1.5B"]
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % (1 << 31)))
    args = _inputs(a, start, m, rng)
    plain, *_ = _run_pair(a, *args, splits=splits)
    out, _, _, _, xh = _run_pair(a, *args, splits=splits, extra={"XH_OUT": 1})
    assert np.array_equal(out.view(np.uint32), plain.view(np.uint32))
    assert np.array_equal(xh.view(np.uint16), xh_layout(out).view(np.uint16))
