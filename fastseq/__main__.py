"""python -m fastseq info | check"""
from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "info"
    if cmd == "check" and os.environ.get("TRITON_INTERPRET") is None:
        import torch

        if not torch.cuda.is_available():  # check the Triton kernels too, in the interpreter
            os.environ["TRITON_INTERPRET"] = "1"
    if cmd == "info":
        from .info import info

        for k, v in info().items():
            print(f"{k:<26} {v}")
        return 0
    if cmd == "check":
        from .check import main as check

        return check()
    print("usage: python -m fastseq [info | check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
