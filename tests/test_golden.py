"""The CPU reference decoder against Hugging Face transformers (golden files made by scripts/make_golden.py).

Greedy continuations must match token for token; a divergence is accepted only where HF's own top-2 margin was
below 1e-3 (a genuine tie that float32 rounding may break either way), and the comparison stops there.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
TIE = 1e-3
MIN_MATCHED = 24


def load_golden(key):
    p = GOLDEN / f"{key}.json"
    if not p.is_file():
        pytest.skip(f"{p} is absent: run scripts/make_golden.py")
    return json.loads(p.read_text()), np.load(GOLDEN / f"{key}_logits.npz")


def greedy(ref, prompt_ids, n):
    cache = ref.new_cache(len(prompt_ids) + n + 1)
    logits = ref.forward(prompt_ids, 0, cache)
    first = logits[-1].copy()
    out = [int(np.argmax(first))]
    for i in range(n - 1):
        out.append(int(np.argmax(ref.forward([out[-1]], len(prompt_ids) + i, cache)[-1])))
    return first, out


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("key", ["1.5b", "0.5b"])
def test_reference_decoder_matches_transformers(key, real_model, real_reference):
    gold, logits = load_golden(key)
    model = real_model(key)
    from conftest import REAL
    from toolchain.fetch import MODELS

    assert gold["gguf_sha256"] == MODELS[REAL[key]].sha256, "golden data was made from another file"
    ref = real_reference(key)
    report = []
    for case in gold["generation"]:
        first, ids = greedy(ref, case["prompt_ids"], len(case["generated_ids"]))
        want = case["generated_ids"]
        matched = 0
        for got, exp, margin in zip(ids, want, case["margins"]):
            if got != exp:
                assert margin < TIE, f"{case['name']}: token {matched} is {got}, HF gave {exp} (margin {margin})"
                break
            matched += 1
        hf = logits[case["name"]]
        abs_err = float(np.abs(first - hf).max())
        rel_err = float(np.linalg.norm(first - hf) / np.linalg.norm(hf))
        report.append((case["name"], matched, abs_err, rel_err))
        assert matched >= MIN_MATCHED or matched == len(want) or case["margins"][matched] < TIE, report[-1]
        assert rel_err < 1e-4 and abs_err < 1e-3, report[-1]  # seen: rel ~1e-6, abs <= 4.2e-5
    print(f"\n{model.path}: (case, tokens matched, max abs logit err, rel logit err)")
    for r in report:
        print(f"  {r[0]:12s} {r[1]:3d}  {r[2]:.2e}  {r[3]:.2e}")
