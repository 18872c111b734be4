"""Sequence to sequence: a GRU encoder-decoder with attention learns to reverse strings of digits.

    python examples/seq2seq_gru.py                    # nn.GRU and nn.GRUCell swapped for fastseq's
    python examples/seq2seq_gru.py --baseline torch   # the same model, initial weights and batches on torch.nn

The encoder is an nn.GRU over the packed (variable-length) digit strings; the decoder is an nn.GRUCell that, at
step t, attends to the encoder outputs with its previous state (dot-product attention, padding masked), reads the
embedding of the previous target token (teacher forcing in training) with the attention context, and predicts the
next token from its new state and the context. Every epoch is `--steps` batches of fresh random strings; the
held-out set is 1000 strings drawn from a separate random stream (at most about 1% of them, the shortest, also
occur among the ~51k training strings of the default run), decoded greedily. Prints the training loss, the
exact-sequence accuracy on the held-out set and the milliseconds each epoch took. Adam with a cosine learning-rate
decay to zero over the run.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import _common

PAD, BOS, EOS = 10, 11, 12  # tokens 0..9 are the digits
VOCAB = 13


def reversal_batch(n: int, min_len: int, max_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """n random digit strings of min_len..max_len digits. Returns src (n, max_len) padded with PAD, lengths (n,)
    and tgt (n, max_len + 1): the reversed string, EOS, then PAD."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    valid = torch.arange(max_len) < lengths[:, None]
    src = torch.randint(0, 10, (n, max_len), generator=generator).masked_fill(~valid, PAD)
    reverse = (lengths[:, None] - 1 - torch.arange(max_len)).clamp(min=0)
    tgt = torch.cat([src.gather(1, reverse).masked_fill(~valid, PAD), torch.full((n, 1), PAD)], 1)
    tgt[torch.arange(n), lengths] = EOS
    return src, lengths, tgt


class Seq2Seq(nn.Module):
    """Encoder nn.GRU, decoder nn.GRUCell with dot-product attention over the encoder outputs."""

    def __init__(self, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed)
        self.encoder = nn.GRU(embed, hidden, batch_first=True)
        self.decoder = nn.GRUCell(embed + hidden, hidden)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def encode(self, src: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """src (n, S), lengths (n,) -> encoder outputs (n, S, hidden), zero past each length, and the final
        state (n, hidden)."""
        packed = pack_padded_sequence(self.embed(src), lengths, batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=src.size(1))[0], h[0]

    def step(self, token: Tensor, h: Tensor, memory: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder step: context = softmax(memory h, padding masked) memory;
        h' = GRUCell([embed(token); context], h); logits = Linear([h'; context]). Returns logits (n, VOCAB), h'."""
        scores = torch.einsum("nsh,nh->ns", memory, h).masked_fill(padding, float("-inf"))
        context = torch.einsum("ns,nsh->nh", scores.softmax(-1), memory)
        h = self.decoder(torch.cat([self.embed(token), context], -1), h)
        return self.out(torch.cat([h, context], -1)), h

    def forward(self, src: Tensor, lengths: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: logits (n, T, VOCAB) for tgt (n, T), the decoder reading BOS, tgt[:, :-1]."""
        memory, h = self.encode(src, lengths)
        inputs = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)
        logits = []
        for t in range(tgt.size(1)):
            step_logits, h = self.step(inputs[:, t], h, memory, src == PAD)
            logits.append(step_logits)
        return torch.stack(logits, 1)

    @torch.no_grad()
    def generate(self, src: Tensor, lengths: Tensor, steps: int) -> Tensor:
        """Greedy decoding: the most likely token at each of `steps` steps, fed back in. Returns (n, steps)."""
        memory, h = self.encode(src, lengths)
        token, tokens = torch.full_like(src[:, 0], BOS), []
        for _ in range(steps):
            logits, h = self.step(token, h, memory, src == PAD)
            token = logits.argmax(-1)
            tokens.append(token)
        return torch.stack(tokens, 1)


def exact_accuracy(model: Seq2Seq, src: Tensor, lengths: Tensor, tgt: Tensor) -> float:
    """Fraction of strings whose greedy decoding matches the target up to and including EOS."""
    out = model.generate(src, lengths, tgt.size(1))
    return ((out == tgt) | (tgt == PAD)).all(1).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    """Trains and evaluates; returns {"replaced", "step_loss" (every training step), "train_loss", "val_acc",
    "ms_per_epoch"} with one entry per epoch in the last three."""
    p = _common.parser(__doc__.splitlines()[0], epochs=8)
    p.set_defaults(steps=100)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    held_out = reversal_batch(1000, args.min_len, args.max_len, torch.Generator().manual_seed(args.seed + 1))
    val_src, val_tgt = held_out[0].to(device), held_out[2].to(device)
    model = Seq2Seq(args.embed, args.hidden).to(device)
    replaced = _common.prepare(model, args.baseline)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * args.steps)
    g_train = torch.Generator().manual_seed(args.seed + 2)

    result = {"replaced": replaced, "step_loss": [], "train_loss": [], "val_acc": [], "ms_per_epoch": []}
    for epoch in range(1, args.epochs + 1):
        start = _common.clock(device)
        model.train()
        step_loss = []
        for _ in range(args.steps):
            src, lengths, tgt = reversal_batch(args.batch, args.min_len, args.max_len, g_train)
            src, tgt = src.to(device), tgt.to(device)
            logits = model(src, lengths, tgt)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=PAD)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step_loss.append(loss.item())
        model.eval()
        val_acc = exact_accuracy(model, val_src, held_out[1], val_tgt)
        ms = _common.clock(device) - start
        train_loss = sum(step_loss) / len(step_loss)
        for key, value in [("train_loss", train_loss), ("val_acc", val_acc), ("ms_per_epoch", ms)]:
            result[key].append(value)
        result["step_loss"] += step_loss
        print(f"epoch {epoch:2d}  train loss {train_loss:.4f}  held-out exact-sequence accuracy {val_acc:6.2%}  "
              f"{ms:8.0f} ms")
    return result


if __name__ == "__main__":
    main()
