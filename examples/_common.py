"""What the examples share: the command line, the text, the fastseq swap and a timer."""
from __future__ import annotations

import argparse
import pathlib
import time

import torch

import fastseq

TEXT = pathlib.Path(__file__).parent / "data" / "gnu_licenses.txt"


def parser(description: str, epochs: int) -> argparse.ArgumentParser:
    """The arguments every example takes: --baseline, --epochs, --steps, --device, --seed."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--baseline", choices=["fastseq", "torch"], default="fastseq",
                   help="fastseq: swap the torch.nn modules for fastseq's; torch: run the model as built")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--steps", type=int, default=None, help="at most this many training steps per epoch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_text() -> tuple[torch.Tensor, list[str]]:
    """The text as character ids (int64) and the sorted characters the ids index."""
    text = TEXT.read_text(encoding="ascii")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def prepare(model: torch.nn.Module, baseline: str) -> dict[str, type]:
    """With baseline "fastseq", swaps the model's recurrent, attention and layer-norm modules for fastseq's (in
    place, weights kept) and prints each swap; with "torch", leaves the model as it is. Returns
    fastseq.replace_modules' {name: torch class replaced} ({} for torch)."""
    if baseline == "torch":
        print("baseline torch: the model runs on torch.nn's modules")
        return {}
    replaced = fastseq.replace_modules(model)
    print(f"fastseq.replace_modules replaced {len(replaced)} modules:")
    for name, cls in replaced.items():
        print(f"  {name}: torch.nn.{cls.__name__} -> fastseq.nn.{type(model.get_submodule(name)).__name__}")
    return replaced


def clock(device: torch.device) -> float:
    """time.perf_counter() after the device's queued work has finished, in milliseconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() * 1e3
