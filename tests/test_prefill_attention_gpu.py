"""The prompt-prefill pair (rope_kv_append + prefill_attention) against the rope_kv_attention contract
(toolchain/ops.py): fresh random inputs, a cache already holding earlier positions, a slot other than 0, the
output poisoned with NaN. Needs a GPU."""
import numpy as np
import pytest

from toolchain import cuda_runtime as cr
from toolchain import kernels as K
from toolchain import ops

pytestmark = pytest.mark.gpu
SHAPES = {"1.5B": dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6),
          "0.5B": dict(n_heads=14, n_kv_heads=2, head_dim=64, rope_theta=1e6),
          "3B": dict(n_heads=16, n_kv_heads=2, head_dim=128, rope_theta=1e6),  # 8 query heads per kv head
          "7B": dict(n_heads=28, n_kv_heads=4, head_dim=128, rope_theta=1e6)}


# rows are (token, q head) pairs packed 64 to a block and keys come in tiles of 32: m = 1, odd m and tile edges, a
# prompt piece deep into the cache
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("start,m", [(0, 100), (37, 64), (300, 33), (0, 1), (31, 17), (2990, 512)])
def test_prefill_pair_matches_contract(shape, start, m):
    a = SHAPES[shape]
    H, KV, D = a["n_heads"], a["n_kv_heads"], a["head_dim"]
    seed = int(np.random.SeedSequence().entropy % (1 << 31))
    rng = np.random.default_rng(seed)
    n_slots, max_seq, slot = 2, start + m + 8, 1
    q = rng.standard_normal((m, H * D)).astype(np.float32)
    k = rng.standard_normal((m, KV * D)).astype(np.float32)
    v = rng.standard_normal((m, KV * D)).astype(np.float32)
    kc = (rng.standard_normal((n_slots, KV, max_seq, D)) * 0.5).astype(np.float16)
    vc = (rng.standard_normal((n_slots, KV, max_seq, D)) * 0.5).astype(np.float16)
    pos = np.arange(start, start + m, dtype=np.int32)
    slots = np.full(m, slot, np.int32)
    want, kc_ref, vc_ref = ops.rope_kv_attention(q, k, v, kc.copy(), vc.copy(), pos, slots, n_heads=H,
                                                 n_kv_heads=KV, head_dim=D, rope_theta=a["rope_theta"])
    defines = K.defines_for("prefill_attention", a)
    dims = dict(a, m=m, n_slots=n_slots, max_seq=max_seq)
    bq, bk, bv, bkc, bvc, bpos, bslots = (cr.DeviceBuffer.from_numpy(x) for x in (q, k, v, kc, vc, pos, slots))
    q_rot = cr.DeviceBuffer.zeros((m, H * D), np.float32)
    out = cr.DeviceBuffer.zeros((m, H * D), np.float32)
    out.fill_u32(0x7FC00000)
    c1 = K.launch_config("rope_kv_append", dims)
    cr.load_op("rope_kv_append", defines).launch(c1, [bq, bk, bv, bpos, bslots, *c1.scalars, q_rot, bkc, bvc])
    c2 = K.launch_config("prefill_attention", dims)
    cr.load_op("prefill_attention", defines).launch(c2, [q_rot, bkc, bvc, bpos, bslots, *c2.scalars, out])
    cr.synchronize()
    got = out.download((m, H * D), np.float32)
    assert np.isfinite(got).all(), f"unwritten or non-finite output (seed={seed})"
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert err < 2e-3, f"rel err {err:.2e} (seed={seed})"
    got_kc = bkc.download(kc.shape, np.float16)
    got_vc = bvc.download(vc.shape, np.float16)
    assert np.array_equal(got_vc, vc_ref), f"v cache (seed={seed})"
    assert np.abs(got_kc.astype(np.float32) - kc_ref.astype(np.float32)).max() < 2e-2, f"k cache (seed={seed})"
    assert np.array_equal(got_kc[0], kc[0]), "slot 0 must be untouched"
    print(f"{shape} start={start} m={m}: rel err {err:.2e}")
