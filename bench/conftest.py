"""Each benchmark's row (group, name, extra_info) is appended to $BENCH_JSONL as soon as it is measured, when that is
set (make gpu-check), so that the rows of a run cut off at its time budget survive."""
from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(autouse=True)
def _log_row(request):
    yield
    path = os.environ.get("BENCH_JSONL")
    bench = request.node.funcargs.get("benchmark")
    if path and bench is not None and bench.extra_info:
        with open(path, "a") as f:
            row = {"group": bench.group, "name": request.node.name, "extra_info": bench.extra_info}
            f.write(json.dumps(row) + "\n")
