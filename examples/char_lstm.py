"""Character-level LSTM language model on examples/data/gnu_licenses.txt.

    python examples/char_lstm.py                    # nn.LSTM swapped for fastseq.nn.LSTM by fastseq.replace_modules
    python examples/char_lstm.py --baseline torch   # the same model, initial weights and data order on torch.nn

Embedding -> 2-layer nn.LSTM -> Linear, trained with truncated backpropagation through time: the text is cut into
`--batch` parallel streams and each step reads the next `--bptt` characters of every stream, starting from the
(detached) state the previous step ended with. Prints train and validation perplexity exp(mean cross entropy) and
the milliseconds each epoch took.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import _common


class CharLSTM(nn.Module):
    """logits(next char) = Linear(LSTM(Embedding(chars)))."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (batch, time) char ids -> logits (batch, time, vocab), final (h, c)."""
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def streams(ids: Tensor, batch: int) -> Tensor:
    """ids cut into `batch` contiguous streams: (batch, len(ids) // batch)."""
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n)


def run_epoch(model: CharLSTM, data: Tensor, bptt: int, optimizer: torch.optim.Optimizer | None = None,
              steps: int | None = None) -> list[float]:
    """One pass over `data` (batch, n) in windows of `bptt` characters, carrying the state across windows; trains
    when given an optimizer. Returns each window's mean cross entropy."""
    losses, state = [], None
    for i, start in enumerate(range(0, data.size(1) - 1, bptt)):
        if steps is not None and i == steps:
            break
        y = data[:, start + 1: start + 1 + bptt]
        x = data[:, start: start + y.size(1)]
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    """Trains and evaluates; returns {"replaced", "step_loss" (every training step), "train_loss", "val_loss",
    "train_ppl", "val_ppl", "ms_per_epoch"} with one entry per epoch in the last five."""
    p = _common.parser(__doc__.splitlines()[0], epochs=10)
    p.add_argument("--embed", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bptt", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    ids, chars = _common.load_text()
    split = int(0.9 * ids.numel())
    train, val = streams(ids[:split], args.batch).to(device), streams(ids[split:], args.batch).to(device)
    model = CharLSTM(len(chars), args.embed, args.hidden, args.layers).to(device)
    replaced = _common.prepare(model, args.baseline)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    result = {"replaced": replaced, "step_loss": [], "train_loss": [], "val_loss": [], "train_ppl": [],
              "val_ppl": [], "ms_per_epoch": []}
    for epoch in range(1, args.epochs + 1):
        start = _common.clock(device)
        model.train()
        step_loss = run_epoch(model, train, args.bptt, optimizer, args.steps)
        model.eval()
        with torch.no_grad():
            val_windows = run_epoch(model, val, args.bptt)
        val_loss = sum(val_windows) / len(val_windows)
        ms = _common.clock(device) - start
        train_loss = sum(step_loss) / len(step_loss)
        for key, value in [("train_loss", train_loss), ("val_loss", val_loss), ("train_ppl", math.exp(train_loss)),
                           ("val_ppl", math.exp(val_loss)), ("ms_per_epoch", ms)]:
            result[key].append(value)
        result["step_loss"] += step_loss
        print(f"epoch {epoch:2d}  train ppl {math.exp(train_loss):7.3f}  val ppl {math.exp(val_loss):7.3f}  "
              f"{ms:8.0f} ms")
    return result


if __name__ == "__main__":
    main()
