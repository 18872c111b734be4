"""Prints the table of a pytest-benchmark JSON file written by `make bench` / `make gpu-check`."""
from __future__ import annotations

import json
import sys

COLUMNS = ["shape", "dtype", "backend", "ms", "torch_ms", "speedup", "GBps", "torch_GBps", "TFLOPs",
           "torch_TFLOPs", "peak_MiB", "torch_peak_MiB"]


def main(path: str) -> int:
    with open(path) as f:
        data = json.load(f)
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows.append([bench["group"] or bench["name"]] + [info.get(c, "") for c in COLUMNS])
    if not rows:
        print("no benchmarks in", path)
        return 1
    used = [i for i in range(len(COLUMNS)) if any(r[i + 1] not in ("", None) for r in rows)]
    header = ["benchmark"] + [COLUMNS[i] for i in used]
    table = [header] + [[str(r[0])] + [str(r[i + 1]) for i in used] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    machine = data.get("machine_info", {})
    device = data["benchmarks"][0]["extra_info"].get("device")
    print(f"# {machine.get('cpu', {}).get('brand_raw', '')} | {device} | speedup = torch_ms / ms (higher is better)")
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
