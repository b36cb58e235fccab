"""Set the few-token GEMMs' defaults (fourteenth session; the device and this machine run the same edit):
python3 scripts/.dev19_flip.py STAGES XSB L2PF"""
import re, sys
from pathlib import Path
st, xsb, pf = (int(v) for v in sys.argv[1:4])
cu = Path("plugins/quant_gemm_skinny.cu")
s = cu.read_text()
for name, v in (("SK_STAGES", st), ("SK_XSB", xsb), ("SK_L2PF", pf)):
    s, n = re.subn(rf"#define {name} \d+", f"#define {name} {v}", s, count=1)
    assert n == 1, name
cu.write_text(s)
kp = Path("toolchain/kernels.py")
s = kp.read_text()
s, n1 = re.subn(r"SKINNY_STAGES, SKINNY_XF16, SKINNY_WARPS = \d+, 1, 8", f"SKINNY_STAGES, SKINNY_XF16, SKINNY_WARPS = {st}, 1, 8", s)
s, n2 = re.subn(r"SKINNY_WARPRING, SKINNY_XSB = 1, \d+", f"SKINNY_WARPRING, SKINNY_XSB = 1, {xsb}", s)
assert n1 == n2 == 1
kp.write_text(s)
print(f"defaults: SK_STAGES={st} SK_XSB={xsb} SK_L2PF={pf}")
