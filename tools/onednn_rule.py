"""The measurement behind fastseq/ops/rnn_layer.py's `_onednn_wins`: fastseq.nn.LSTM timed with FASTSEQ_ONEDNN=0
(fastseq's loop) and =1 (oneDNN's LSTM primitive) alternated in one process, C=H, the better of two runs of each;
prints oneDNN's speed over fastseq's loop per rows N and hidden size H, for each sequence length T.

    python tools/onednn_rule.py [--train] [--dtype bfloat16] [--ns 1,2,4,8,16] [--hs 128,256,512,1024] [--ts 100]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from fastseq import nn as fnn


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", action="store_true", help="forward+backward (default: forward without grad)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--ns", default="1,2,4,8,16")
    p.add_argument("--hs", default="128,256,512,1024")
    p.add_argument("--ts", default="100", help="sequence lengths T")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    hs = [int(v) for v in args.hs.split(",")]
    torch.manual_seed(0)
    for t in (int(v) for v in args.ts.split(",")):
        table(t, [int(v) for v in args.ns.split(",")], hs, dtype, args.train)


def table(t: int, ns: list[int], hs: list[int], dtype: torch.dtype, train: bool) -> None:
    print(f"oneDNN's speed over fastseq's loop, {'forward+backward' if train else 'forward, no grad'}, "
          f"{str(dtype)[6:]}, T={t}, C=H")
    print("N\\H  " + " ".join(f"{h:>6}" for h in hs))
    for n in ns:
        row = []
        for h in hs:
            lstm = fnn.LSTM(h, h, dtype=dtype)
            x = torch.randn(t, n, h, dtype=dtype, requires_grad=train)
            dy = torch.randn(t, n, h, dtype=dtype)
            leaves = [x, *lstm.parameters()]

            def step() -> None:
                if not train:
                    with torch.no_grad():
                        lstm(x)
                    return
                torch.autograd.grad(lstm(x)[0], leaves, dy)

            reps = 3 if t * n * h >= 409600 else 6 if t >= 10 else 30
            best: dict[str, float] = {}
            for value in ("0", "1", "0", "1"):
                os.environ["FASTSEQ_ONEDNN"] = value
                best[value] = min(best.get(value, float("inf")), best_of(step, reps))
            row.append(best["0"] / best["1"])
        print(f"{n:<5}" + " ".join(f"{r:6.2f}" for r in row), flush=True)


if __name__ == "__main__":
    main()
