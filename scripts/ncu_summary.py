"""Summarize an Nsight Compute CSV of the decode step (scripts/profile_step.py under `ncu --csv`): one line per
kernel family (mean over its launches) with duration, DRAM and L1 throughput, issue rate and the largest warp
stall reasons. Reads both `--page details` (a metric per row) and `--page raw` (a kernel per row) files.

    python3 scripts/ncu_summary.py ncu.csv [--per-launch]
"""
import argparse
import csv
import gzip
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toolchain.errors import UserError  # noqa: E402
from toolchain.kernels import QMV1_WARPS  # noqa: E402

DETAILS = {"Duration": "duration_ns", "DRAM Throughput": "dram_pct", "L1/TEX Cache Throughput": "l1_pct",
           "Issued Warp Per Scheduler": "issue_per_cycle", "Warp Cycles Per Issued Instruction": "cycles_per_issue",
           "Registers Per Thread": "registers", "Achieved Active Warps Per SM": "warps_per_sm"}
RAW = {"gpu__time_duration.sum": "duration_ns", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
       "l1tex__throughput.avg.pct_of_peak_sustained_active": "l1_pct",
       "smsp__issue_active.avg.per_cycle_active": "issue_per_cycle", "launch__registers_per_thread": "registers",
       "smsp__inst_executed.sum": "instructions"}
STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")


def number(s: str) -> float:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return float("nan")


def read(path: str) -> list[dict]:
    """Kernels of an ncu CSV, in launch order; UserError (one line) if the file is missing or not ncu's CSV."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            rows = list(csv.reader(line for line in f if line.startswith('"')))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); pass the CSV that `ncu --csv` wrote")
    hdr = rows[0] if rows else []
    if "Kernel Name" not in hdr or len(rows) < 2:
        raise UserError(f"{path}: not an Nsight Compute CSV with kernels (no 'Kernel Name' column or no rows); "
                         "write one with `ncu --csv --page details` or `--page raw`")
    I = {h: i for i, h in enumerate(hdr)}
    kernels: "OrderedDict[str, dict]" = OrderedDict()
    if "Metric Name" in I:  # details page
        for r in rows[1:]:
            k = kernels.setdefault(r[I["ID"]], {"name": r[I["Kernel Name"]], "block": r[I["Block Size"]],
                                                "grid": r[I["Grid Size"]]})
            if r[I["Metric Name"]] in DETAILS:
                k[DETAILS[r[I["Metric Name"]]]] = number(r[I["Metric Value"]])
        return list(kernels.values())
    out = []
    for r in rows[2:]:  # raw page: the second row holds units
        k = {"name": r[I["Kernel Name"]], "block": r[I["Block Size"]], "grid": r[I["Grid Size"]]}
        k |= {v: number(r[I[m]]) for m, v in RAW.items() if m in I}
        k["stalls"] = {h[len(STALL[0]):-len(STALL[1])]: number(r[I[h]]) for h in hdr
                       if h.startswith(STALL[0]) and h.endswith(STALL[1])}
        out.append(k)
    return out


def label(k: dict) -> str:
    """The two matmul_add launches of a layer apart: o_proj (k = 1536) is a one-warp-per-row-pair build in blocks of
    QMV1_WARPS warps, ffn_down a k-split build in larger blocks (toolchain/kernels.py decode_core)."""
    if k["name"] == "matmul_add":
        o_proj = k["block"].startswith(f"({32 * QMV1_WARPS},")
        return "matmul_add (o_proj)" if o_proj else "matmul_add (ffn_down)"
    return k["name"]


def line(name: str, ks: list[dict]) -> str:
    mean = lambda key: sum(k.get(key, float("nan")) for k in ks) / len(ks)  # noqa: E731
    s = (f"{name:24s} x{len(ks):<3d} {mean('duration_ns') / 1e3:7.2f} us  DRAM {mean('dram_pct'):5.1f}%  "
         f"L1 {mean('l1_pct'):5.1f}%  issue {mean('issue_per_cycle'):4.2f}/cycle  regs {mean('registers'):3.0f}")
    if "stalls" in ks[0]:
        st = defaultdict(float)
        for k in ks:
            for n, v in k["stalls"].items():
                st[n] += v / len(ks)
        s += "  stalls/issue: " + ", ".join(f"{n} {v:.2f}" for n, v in sorted(st.items(), key=lambda x: -x[1])[:4])
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--per-launch", action="store_true")
    a = ap.parse_args()
    try:
        kernels = read(a.csv)
    except UserError as e:
        print(f"ncu_summary: {e}", file=sys.stderr)
        return 2
    groups: "OrderedDict[str, list]" = OrderedDict()
    for k in kernels:
        groups.setdefault(label(k), []).append(k)
        if a.per_launch:
            print(line(label(k), [k]))
    for name, ks in groups.items():
        print(line(name, ks))
    print(f"sum of durations {sum(k.get('duration_ns', 0) for k in kernels) / 1e3:.1f} us over {len(kernels)} launches")


if __name__ == "__main__":
    sys.exit(main())
