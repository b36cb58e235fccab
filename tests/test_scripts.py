"""CPU tests of the performance scripts' own logic (their GPU work runs on the device only)."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw_csv(path, kernels):
    """An `ncu --csv --page raw` file: header row, units row, one row per kernel."""
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    cols = ["ID", "Kernel Name", "Block Size", "Grid Size", "gpu__time_duration.sum", "launch__registers_per_thread",
            stall.format("long_scoreboard"), stall.format("barrier")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(cols)
        w.writerow(["", "", "", "", "ns", "register/thread", "", ""])
        for i, k in enumerate(kernels):
            w.writerow([i, k["name"], k["block"], "(132, 1, 1)", f"{k['ns']:,}", k["regs"], k["long"], k["barrier"]])


def test_ncu_summary_means_and_labels(tmp_path):
    rng = np.random.default_rng()
    down = [dict(name="matmul_add", block="(576, 1, 1)", ns=int(rng.integers(5000, 20000)), regs=96,
                 long=float(rng.uniform(1, 6)), barrier=float(rng.uniform(0, 1))) for _ in range(3)]
    o = [dict(name="matmul_add", block="(256, 1, 1)", ns=int(rng.integers(2000, 8000)), regs=101, long=0.5,
              barrier=2.0)]
    path = tmp_path / "raw.csv"
    _raw_csv(path, [down[0], o[0], down[1], down[2]])
    ns = _load("ncu_summary")
    ks = ns.read(str(path))
    assert [ns.label(k) for k in ks] == ["matmul_add (ffn_down)", "matmul_add (o_proj)", *["matmul_add (ffn_down)"] * 2]
    line = ns.line("down", [k for k in ks if ns.label(k).endswith("(ffn_down)")])
    assert f"{np.mean([d['ns'] for d in down]) / 1e3:7.2f} us" in line
    assert line.index("long_scoreboard") < line.index("barrier")  # largest stall first (long > 1 > barrier)
    assert f"long_scoreboard {np.mean([d['long'] for d in down]):.2f}" in line


def test_ncu_summary_bad_input_one_line_exit_2(tmp_path):
    bad = tmp_path / "not_ncu.csv"
    bad.write_text("hello\n")
    for path in (bad, tmp_path / "missing.csv"):
        r = subprocess.run([sys.executable, str(SCRIPTS / "ncu_summary.py"), str(path)], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", r
        assert len(r.stderr.strip().splitlines()) == 1 and str(path) in r.stderr, r.stderr
