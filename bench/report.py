"""Prints the table of benchmark results: a pytest-benchmark JSON file (`make bench`) or a JSON-lines file of rows
(`make gpu-check`'s bench.jsonl)."""
from __future__ import annotations

import json
import sys

COLUMNS = ["shape", "dtype", "backend", "ms", "torch_ms", "speedup", "GBps", "torch_GBps", "TFLOPs",
           "torch_TFLOPs", "peak_MiB", "torch_peak_MiB"]


def load(path: str) -> tuple[list[dict], str]:
    """The benchmark rows ({group, name, extra_info}) and the CPU's name where the file gives it."""
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()], ""
        data = json.load(f)
    return data["benchmarks"], data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")


def table(rows: list[dict], cpu: str = "") -> list[str]:
    """The rows as aligned text lines, columns that no row fills left out, extra columns (torch's SDPA backends'
    times and ratios; the persistent layer rows' kernel, host loop time and ratio) appended."""
    extra = sorted({k for r in rows for k in r["extra_info"]
                    if k.startswith(("torch_", "speedup_vs_", "host_")) or k == "kernel"} - set(COLUMNS))
    columns = COLUMNS + extra
    cells = [[str(r["group"] or r["name"])] + [r["extra_info"].get(c, "") for c in columns] for r in rows]
    used = [i for i in range(len(columns)) if any(c[i + 1] not in ("", None) for c in cells)]
    header = ["benchmark"] + [columns[i] for i in used]
    text = [header] + [[c[0]] + [str(c[i + 1]) for i in used] for c in cells]
    widths = [max(len(r[i]) for r in text) for i in range(len(header))]
    device = rows[0]["extra_info"].get("device")
    return [f"# {cpu} | {device} | speedup = torch_ms / ms (higher is better)"] + \
        ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text]


def main(path: str) -> int:
    rows, cpu = load(path)
    if not rows:
        print("no benchmarks in", path)
        return 1
    print("\n".join(table(rows, cpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
