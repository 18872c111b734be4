"""The examples train the same on fastseq's modules as on torch's: each example, shortened to a few steps of a tiny
model, gives the same losses with --baseline fastseq as with --baseline torch, and swaps the modules it should."""
from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))

# fastseq's float32 kernels round differently from torch's (other summation orders, fused steps): a few ulp per op,
# ~1e-7 relative. Over a few optimizer steps these differences grow (Adam amplifies them in parameters whose
# gradients are near zero); the losses here agree to about 2e-7 relative. rtol 1e-4 leaves room for other kernels
# and machines while staying far below what a wrong gate, mask or weight changes (the loss moves ~1e-2 per step).
RTOL = 1e-4

RUNS = {
    "char_lstm": (["--embed", "16", "--hidden", "32", "--batch", "8", "--bptt", "16"], {"lstm"}),
    "transformer_mlm": (["--dim", "32", "--heads", "2", "--ff", "64", "--layers", "1", "--seq", "32", "--batch", "8"],
                        {"encoder.layers.0.self_attn", "encoder.layers.0.norm1", "encoder.layers.0.norm2",
                         "encoder.norm"}),
    "seq2seq_gru": (["--embed", "8", "--hidden", "32", "--batch", "16", "--max-len", "6"], {"encoder", "decoder"}),
}
CASES = [("char_lstm", []), ("transformer_mlm", []), ("transformer_mlm", ["--no-padding-mask"]), ("seq2seq_gru", [])]


@pytest.mark.parametrize("name,extra", CASES, ids=[" ".join([n, *e]) for n, e in CASES])
def test_fastseq_trains_like_torch(name: str, extra: list[str]) -> None:
    example = importlib.import_module(name)
    args, swapped = RUNS[name]
    argv = [*args, *extra, "--epochs", "2", "--steps", "3", "--device", "cpu", "--seed", "1"]
    ours = example.main(argv)
    torchs = example.main([*argv, "--baseline", "torch"])
    assert set(ours["replaced"]) == swapped
    assert torchs["replaced"] == {}
    assert len(ours["step_loss"]) == 6
    for key in ours:
        if key.endswith("loss"):
            assert ours[key] == pytest.approx(torchs[key], rel=RTOL), key
        elif key.endswith("acc"):  # the same predictions up to a few near-ties
            assert ours[key] == pytest.approx(torchs[key], abs=5e-3), key
