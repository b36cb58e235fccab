"""Pick the few-token GEMMs' default from decode_tuning's tuning.json (fourteenth session): candidates against control,
mean aggregate gain at m = 8 / 16 / 32; prints 'STAGES XSB L2PF' of the best if it gains >= 2% with no m below -1% and
the kernel tests log says 'passed' with no 'failed', else the current defaults (2 4 0)."""
import json, sys
tune = json.load(open(sys.argv[1]))
ktests = open(sys.argv[2]).read()
cands = {"skinny_l2pf8": (2, 4, 8), "skinny_l2pf3": (2, 4, 3), "skinny_s3x1": (3, 1, 0), "skinny_s3x1_l2pf8": (3, 1, 8)}
rows = {v["name"]: v for v in tune["variants"]}
ms = (8, 16, 32)
def agg(r):
    return [r[f"m{m}_ctx128_tok_s"] for m in ms]
base = agg(rows["control"])
best, pick = 0.02, (2, 4, 0)
for name, d in cands.items():
    if name in rows and rows[name].get("deterministic", True):
        gains = [a / b - 1 for a, b in zip(agg(rows[name]), base)]
        g = sum(gains) / len(ms)
        print(f"{name}: {g:+.1%} ({', '.join(f'{x:+.1%}' for x in gains)})", file=sys.stderr)
        if g > best and min(gains) > -0.01:
            best, pick = g, d
if "failed" in ktests or "passed" not in ktests:
    print("kernel tests did not all pass: keeping the defaults", file=sys.stderr)
    pick = (2, 4, 0)
print(*pick)
