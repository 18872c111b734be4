"""An LSTM layer's inference memory as the process pays it: the growth of the peak resident set (VmHWM) over one
forward without grad, in a fresh process per run, for fastseq.nn.LSTM and torch.nn.LSTM (T, N, H given, C = H).
The benchmark's peak_MiB counts torch's allocator only, which does not see what oneDNN allocates for torch's LSTM
(its weights in its own layout, its workspace); this counts everything, weights created before the baseline aside.

    python tools/inference_memory.py [--shapes 100x1x1024,100x64x512,1000x1x1024,1000x64x512]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys, torch
T, N, H, which = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if which == "fastseq":
    import fastseq.nn as nn
else:
    nn = torch.nn
torch.manual_seed(0)
lstm, x = nn.LSTM(H, H), torch.randn(T, N, H)
def hwm_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
base = hwm_kib()
with torch.no_grad():
    y = lstm(x)[0]
print((hwm_kib() - base) / 1024, y.numel() * y.element_size() / 2**20)
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="100x1x1024,100x64x512,1000x1x1024,1000x64x512", help="TxNxH,...")
    args = p.parse_args()
    print(f"{'T':>5} {'N':>4} {'H':>5} {'output MiB':>10} {'fastseq MiB':>11} {'torch MiB':>9}")
    for shape in args.shapes.split(","):
        t, n, h = shape.split("x")
        got = {}
        for which in ("fastseq", "torch"):
            out = subprocess.run([sys.executable, "-c", CHILD, t, n, h, which], check=True, capture_output=True,
                                 text=True).stdout.split()
            got[which], output = float(out[0]), float(out[1])
        print(f"{t:>5} {n:>4} {h:>5} {output:10.1f} {got['fastseq']:11.1f} {got['torch']:9.1f}")


if __name__ == "__main__":
    main()
