"""Masked character model: a small Transformer encoder on examples/data/gnu_licenses.txt.

    python examples/transformer_mlm.py                    # MultiheadAttention and LayerNorm swapped for fastseq's
    python examples/transformer_mlm.py --baseline torch   # the same model, initial weights and masks on torch.nn
    python examples/transformer_mlm.py --no-padding-mask  # evaluate on full-length chunks, without a mask

nn.TransformerEncoder of pre-norm nn.TransformerEncoderLayer (batch_first, dropout 0 so that both runs compute the
same function) over character embeddings plus sinusoidal position encodings. Each training chunk of `--seq`
characters has about 15% of its characters replaced by [MASK]; the loss is the cross entropy of the masked
characters. Validation runs in eval mode on chunks of random length (seq/2 to seq) padded to `--seq` with a key
padding mask, or on full-length chunks without one, with the same masked positions every epoch. (In eval mode
without grad, nn.TransformerEncoderLayer would call torch's fused kernel instead of its submodules;
fastseq.replace_modules turns that off for the layers whose attention it replaced, so validation runs on fastseq's
modules as well.) Prints masked-character loss and accuracy and the milliseconds each epoch took.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import _common


def sinusoids(seq: int, dim: int) -> Tensor:
    """Sinusoidal position encodings (seq, dim): sin(p / 10000^(2i/dim)) at 2i, cos(...) at 2i+1."""
    angle = torch.arange(seq)[:, None] / 10000 ** (torch.arange(0, dim, 2) / dim)
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(1)


class MaskedCharModel(nn.Module):
    """logits(char) = Linear(TransformerEncoder(Embedding(chars) + sinusoids(positions)))."""

    def __init__(self, vocab: int, seq: int, dim: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.register_buffer("position", sinusoids(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x (batch, seq) token ids, padding_mask (batch, seq) True where padded -> logits (batch, seq, vocab)."""
        h = self.embed(x) + self.position[: x.size(1)]
        return self.head(self.encoder(h, src_key_padding_mask=padding_mask))


def mask_tokens(x: Tensor, mask_id: int, generator: torch.Generator,
                maskable: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Picks each position (each maskable one, if given) with probability 0.15 and replaces it by mask_id.
    Returns the input with the masks and the boolean positions picked."""
    pick = (torch.rand(x.shape, generator=generator) < 0.15).to(x.device)
    if maskable is not None:
        pick &= maskable
    return x.masked_fill(pick, mask_id), pick


def masked_loss(model: MaskedCharModel, x: Tensor, pick: Tensor, target: Tensor,
                padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mean cross entropy and number correct over the picked positions."""
    logits = model(x, padding_mask)[pick]
    return nn.functional.cross_entropy(logits, target[pick]), (logits.argmax(-1) == target[pick]).sum()


def main(argv: list[str] | None = None) -> dict:
    """Trains and evaluates; returns {"replaced", "step_loss" (every training step), "train_loss", "val_loss",
    "val_acc", "ms_per_epoch"} with one entry per epoch in the last four."""
    p = _common.parser(__doc__.splitlines()[0], epochs=25)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ff", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-padding-mask", dest="padding_mask", action="store_false",
                   help="validate on full-length chunks without a key padding mask")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    ids, chars = _common.load_text()
    pad_id, mask_id = len(chars), len(chars) + 1
    split = int(0.9 * ids.numel())
    train = ids[:split][: split // args.seq * args.seq].view(-1, args.seq)
    val = ids[split:][: (ids.numel() - split) // args.seq * args.seq].view(-1, args.seq)

    # Validation batch: fixed lengths (seq/2..seq with a padding mask, else seq) and fixed masked positions.
    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (val.size(0),), generator=g) if args.padding_mask \
        else torch.full((val.size(0),), args.seq)
    padded = torch.arange(args.seq) >= lengths[:, None]
    val_x, val_pick = mask_tokens(val.masked_fill(padded, pad_id), mask_id, g, ~padded)
    val_x, val_pick, val, padded = (t.to(device) for t in (val_x, val_pick, val, padded))
    val_padding = padded if args.padding_mask else None

    model = MaskedCharModel(len(chars) + 2, args.seq, args.dim, args.heads, args.ff, args.layers).to(device)
    replaced = _common.prepare(model, args.baseline)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    g_train = torch.Generator().manual_seed(args.seed + 2)

    result = {"replaced": replaced, "step_loss": [], "train_loss": [], "val_loss": [], "val_acc": [],
              "ms_per_epoch": []}
    for epoch in range(1, args.epochs + 1):
        start = _common.clock(device)
        model.train()
        order = torch.randperm(train.size(0), generator=g_train)
        step_loss = []
        for step, first in enumerate(range(0, train.size(0) - args.batch + 1, args.batch)):
            if step == args.steps:
                break
            y = train[order[first: first + args.batch]].to(device)
            x, pick = mask_tokens(y, mask_id, g_train)
            loss, _ = masked_loss(model, x, pick, y, None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_loss.append(loss.item())
        model.eval()
        with torch.no_grad():
            val_loss, correct = masked_loss(model, val_x, val_pick, val, val_padding)
        ms = _common.clock(device) - start
        train_loss, val_acc = sum(step_loss) / len(step_loss), correct.item() / val_pick.sum().item()
        for key, value in [("train_loss", train_loss), ("val_loss", val_loss.item()), ("val_acc", val_acc),
                           ("ms_per_epoch", ms)]:
            result[key].append(value)
        result["step_loss"] += step_loss
        print(f"epoch {epoch:2d}  train loss {train_loss:.4f}  val loss {val_loss.item():.4f}  "
              f"val acc {val_acc:6.2%}  {ms:8.0f} ms")
    return result


if __name__ == "__main__":
    main()
