"""Padded sequences: a 1-D CNN with BatchNorm over padded (N, C, L) batches, unmasked vs masked, side by side.

The task (synthetic, seeded, no download): classify sequences of random lengths in [--min-length, --length] by the
frequency of a noisy sine wave (4 classes) on a constant offset, channel 0 the signal and channel 1 noise alone.
Every batch is zero-padded to --length, as a fixed-shape input pipeline does, with a (N, L) mask of its valid
positions.

Two models, built from the same seed (the same convolution and head weights; BatchNorm draws no random numbers):
`Conv1d(2->H, 5) -> BN -> ReLU -> Conv1d(H->H, 5) -> BN -> ReLU -> mean over the valid positions -> Linear(H, 4)`.
- "unmasked": torch's nn.BatchNorm1d, then ReLU and `y * mask` (what users write today): the batch statistics
  count the padded positions (the convolution's output there is mostly its bias, not data), so the running stats
  drift away from the statistics of the valid data, and each sample's normalisation depends on how much of
  its batch is padding.
- "masked": bnfast.FusedBatchNorm1d(H, activation="relu") called with `mask=` and `pad_value=0.0`: statistics over
  the valid positions only, ReLU and the zeros at padded positions in the same pass.
Both see the very same batches (Adam with a linear decay to 0, --epochs, --batch-size); padded positions are zeroed
after every layer and the pooling averages the valid positions only in both, so the BatchNorm statistics are the one
difference.

Printed at the end, per model: for each BatchNorm layer, its running stats against the true statistics of its
input over the valid positions of the training set (computed in eval mode with the final weights): the mean error
in units of the valid data's standard deviation (mean over channels of |running_mean - mean| / std) and the
variance ratio (mean over channels of running_var / var; 1 is right); then train and test accuracy (eval mode).
`--json PATH` also writes them as JSON.

Backend: bnfast runs its Triton kernels on CUDA, or on CPU under TRITON_INTERPRET=1 (slow, exact); on CPU otherwise
its masked BatchNorm runs in torch ops with the same semantics (statistics over the valid positions). The default
run took 34 s on a shared 2-core CPU (torch fallback).

    python examples/padded_sequences.py                  # --help lists the options
    python examples/padded_sequences.py --epochs 5 --min-length 4
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import bnfast

CLASSES = 4
FREQUENCIES = (0.04, 0.08, 0.12, 0.16)  # cycles per step, one per class
OFFSET, AMPLITUDE, NOISE = 2.0, 1.0, 0.8
IN_CHANNELS = 2
MODEL_NAMES = ("unmasked", "masked")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Masked vs unmasked BatchNorm on zero-padded variable-length sequences (a small 1-D CNN).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train", type=int, default=2048, help="training sequences")
    parser.add_argument("--test", type=int, default=1024, help="test sequences")
    parser.add_argument("--length", type=int, default=64, help="padded length L (the longest sequence)")
    parser.add_argument("--min-length", type=int, default=8, help="shortest sequence")
    parser.add_argument("--hidden", type=int, default=32, help="channels H of the convolutions")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate, decayed linearly to 0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if not 2 <= args.min_length <= args.length:
        parser.error("need 2 <= --min-length <= --length")
    return args


def make_split(n: int, length: int, min_length: int, generator: torch.Generator):
    """(x (n, 2, L) zero-padded, mask (n, L) bool, labels (n,)): a noisy sine of the label's frequency on an offset."""
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    lengths = torch.randint(min_length, length + 1, (n,), generator=generator)
    t = torch.arange(length, dtype=torch.float32)
    phase = torch.rand(n, 1, generator=generator) * 2 * math.pi
    freq = torch.tensor(FREQUENCIES)[labels][:, None]
    signal = AMPLITUDE * torch.sin(2 * math.pi * freq * t + phase)
    noise = NOISE * torch.randn(n, IN_CHANNELS, length, generator=generator)
    x = OFFSET + noise
    x[:, 0] += signal
    mask = t[None, :] < lengths[:, None]
    return x * mask[:, None], mask, labels


class SequenceCNN(nn.Module):
    """Two Conv1d -> BN -> ReLU blocks, mean over the valid positions, a linear head; padded positions stay 0."""

    def __init__(self, hidden: int, masked: bool):
        super().__init__()
        self.masked = masked
        bn = (
            (lambda: bnfast.FusedBatchNorm1d(hidden, activation="relu")) if masked else (lambda: nn.BatchNorm1d(hidden))
        )
        self.conv1 = nn.Conv1d(IN_CHANNELS, hidden, 5, padding=2)
        self.bn1 = bn()
        self.conv2 = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.bn2 = bn()
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[:, None].to(x.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            z = conv(x)
            if self.masked:  # statistics over the valid positions; ReLU and the zero padding in the same pass
                x = bn(z, mask=mask, pad_value=0.0)
            else:  # what users write today: the statistics count the padding
                x = F.relu(bn(z)) * keep
        pooled = x.sum(2) / keep.sum(2)
        return self.head(pooled)

    def batch_norms(self):
        return (self.bn1, self.bn2)


def build_models(hidden: int, seed: int, device) -> dict[str, SequenceCNN]:
    models = {}
    for name in MODEL_NAMES:
        torch.manual_seed(seed)  # the same convolution and head weights in both
        models[name] = SequenceCNN(hidden, masked=name == "masked").to(device)
    return models


@torch.no_grad()
def accuracy(model: SequenceCNN, data, batch_size: int = 512) -> float:
    model.eval()
    x, mask, labels = data
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += (
            model(x[i : i + batch_size], mask[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]
        ).sum()
    return float(correct) / len(labels)


@torch.no_grad()
def valid_statistics(model: SequenceCNN, data, batch_size: int = 512) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer, (mean, var) per channel of its input over the valid positions of `data`, in eval mode
    (the inputs the running stats stand for), in float64."""
    model.eval()
    x, mask, _ = data
    sums = [None] * len(model.batch_norms())
    captured = {}
    hooks = [
        bn.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
        for i, bn in enumerate(model.batch_norms())
    ]
    try:
        for start in range(0, len(x), batch_size):
            m = mask[start : start + batch_size]
            model(x[start : start + batch_size], m)
            for i, z in captured.items():
                rows = z.movedim(1, -1)[m].double()  # (valid positions, H)
                part = torch.stack([torch.full_like(rows[0], len(rows)), rows.sum(0), rows.square().sum(0)])
                sums[i] = part if sums[i] is None else sums[i] + part
    finally:
        for hook in hooks:
            hook.remove()
    stats = []
    for count, total, squares in sums:
        mean = total / count
        stats.append((mean, squares / count - mean.square()))
    return stats


def running_stat_errors(model: SequenceCNN, data) -> list[dict[str, float]]:
    """Per BatchNorm layer: mean over channels of |running_mean - valid mean| / valid std, and of running_var /
    valid var."""
    errors = []
    for bn, (mean, var) in zip(model.batch_norms(), valid_statistics(model, data), strict=True):
        rm, rv = bn.running_mean.double(), bn.running_var.double()
        errors.append(
            {
                "mean_error_in_std": float(((rm - mean).abs() / var.sqrt()).mean()),
                "var_ratio": float((rv / var).mean()),
            }
        )
    return errors


def train(models, optimizers, schedulers, data, batch_size: int, generator: torch.Generator) -> dict[str, float]:
    """One epoch: every batch through every model in turn. Returns each model's mean training loss."""
    x, mask, labels = data
    order = torch.randperm(len(labels), generator=generator).to(x.device)
    losses = dict.fromkeys(models, 0.0)
    steps = len(order) // batch_size
    for model in models.values():
        model.train()
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        for name, model in models.items():
            optimizers[name].zero_grad()
            loss = F.cross_entropy(model(x[idx], mask[idx]), labels[idx])
            loss.backward()
            optimizers[name].step()
            schedulers[name].step()
            losses[name] += loss.item() / steps
    return losses


def backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "Triton kernels (CUDA)"
    return "Triton interpreter" if bnfast.kernels.is_interpreted() else "torch ops (CPU fallback, masked semantics)"


def print_table(results: dict) -> None:
    rows = []
    for layer in range(len(results["masked"]["running_stats"])):
        for key, label in (("mean_error_in_std", "|run. mean - valid mean| / std"), ("var_ratio", "run. var / var")):
            rows.append(
                (f"BN{layer + 1} {label}", *(results[m]["running_stats"][layer][key] for m in MODEL_NAMES), "{:.4f}")
            )
    rows.append(("train accuracy (eval mode)", *(results[m]["train_accuracy"] for m in MODEL_NAMES), "{:.4f}"))
    rows.append(("test accuracy", *(results[m]["test_accuracy"] for m in MODEL_NAMES), "{:.4f}"))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'':{width}} | unmasked (torch BN) | masked (bnfast) |")
    print(f"|{'-' * (width + 2)}|--------------------:|----------------:|")
    for label, unmasked, masked, fmt in rows:
        print(f"| {label:{width}} | {fmt.format(unmasked):>19} | {fmt.format(masked):>15} |")
    print(
        "\nrunning stats vs the true statistics of each BN's input over the valid positions of the training set "
        "(mean error 0 and variance ratio 1 are exact)"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    generator = torch.Generator().manual_seed(args.seed)
    train_data = tuple(t.to(device) for t in make_split(args.train, args.length, args.min_length, generator))
    test_data = tuple(t.to(device) for t in make_split(args.test, args.length, args.min_length, generator))
    padding = 1 - train_data[1].float().mean().item()
    print(
        f"{args.train} training / {args.test} test sequences, lengths {args.min_length}..{args.length} padded to "
        f"{args.length} ({padding:.0%} padding); device {device}, bnfast: {backend(device)}"
    )
    models = build_models(args.hidden, args.seed, device)
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=args.lr) for name, m in models.items()}
    # linear decay to 0: the weights settle at the end, so the running stats describe the final model
    total = args.epochs * (args.train // args.batch_size)
    schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1 - k / total) for n, o in optimizers.items()}
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = train(models, optimizers, schedulers, train_data, args.batch_size, generator)
        accs = {name: accuracy(m, test_data) for name, m in models.items()}
        print(
            f"[epoch {epoch}/{args.epochs}] "
            + " | ".join(f"{n}: loss {losses[n]:.4f}, test acc {accs[n]:.4f}" for n in MODEL_NAMES)
            + f" | {time.perf_counter() - start:.1f} s"
        )
    results = {
        name: {
            "running_stats": running_stat_errors(model, train_data),
            "train_accuracy": accuracy(model, train_data),
            "test_accuracy": accuracy(model, test_data),
        }
        for name, model in models.items()
    }
    results["config"] = {**vars(args), "device": str(device), "backend": backend(device), "padding": padding}
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
