"""The one-page summary of a `make gpu-check` run, printed as Markdown: test counts per backend from the junit XML
with failures and skip reasons, the verdicts of `fastseq check`, and the benchmark table.

    python tools/gpu_summary.py RESULTS_DIR SECONDS
"""
from __future__ import annotations

import collections
import os
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from report import load, table  # noqa: E402


def tests(path: str) -> list[str]:
    if not os.path.exists(path):
        return ["no junit XML (the test stage was skipped or cut off: see gpu-tests.txt)"]
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failed, skips = [], collections.Counter()
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        backend = m.group(1) if (m := re.search(r"\b(cuda-cuda|triton-cuda)\b", name)) else "other"
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if (el := case.find(tag)) is not None:
                outcome = tag
                if tag == "skipped":
                    skips[(el.get("message") or "")[:150]] += 1
                else:
                    message = (el.get("message") or "").strip().splitlines()
                    failed.append(f"- {name}: {message[0][:200] if message else ''}")
        counts[backend][outcome] += 1
    lines = ["| backend | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
    for backend, c in sorted(counts.items()):
        lines.append(f"| {backend} | {c['passed']} | {c['failure']} | {c['error']} | {c['skipped']} |")
    if failed:
        lines += ["", f"Failed ({len(failed)}):"] + failed[:40] + (["- ..."] if len(failed) > 40 else [])
    if skips:
        lines += ["", "Skipped, by reason:"] + [f"- {n} x {reason}" for reason, n in skips.most_common(20)]
    return lines


def main(results: str, seconds: str) -> int:
    out = ["", f"Total: {seconds} s", "", "## GPU tests", ""] + tests(os.path.join(results, "gpu-tests.xml"))
    check = os.path.join(results, "check.txt")
    if os.path.exists(check):
        lines = [line.rstrip() for line in open(check)]
        passed = sum(line.startswith("pass ") for line in lines)
        others = [line for line in lines if re.match(r"(FAIL|skip) |check:|Traceback|\w*Error", line)]
        out += ["", f"## fastseq check ({passed} passed; the rest below)", "", "```"] + others[-40:] + ["```"]
    bench = os.path.join(results, "bench.jsonl")
    if os.path.exists(bench) and os.path.getsize(bench):
        rows, _ = load(bench)
        out += ["", f"## Benchmarks ({len(rows)} rows)", "", "```"] + table(rows) + ["```"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
