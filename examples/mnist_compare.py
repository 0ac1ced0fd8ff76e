"""MNIST: a model without BatchNorm, with torch's BatchNorm, and with bnfast, trained side by side.

The experiment (defaults = the reference tutorial): images flattened to 784 values in [0, 1], the model
`Linear(784, H) -> [BN] -> act -> Linear(H, H) -> [BN] -> act -> Linear(H, 10)`, cross-entropy, Adam, batch 32
shuffled with the incomplete last batch dropped, 10 epochs, seed 1. `--arch cnn` trains a small CNN instead:
`Conv(1->16, 3) -> [BN2d] -> act -> MaxPool(2) -> Conv(16->32, 3) -> [BN2d] -> act -> MaxPool(2) -> Linear(800,
10)` on the same 28x28 images (`--channels-last` runs it in torch.channels_last).

Design:
- Same start. The no-BN and torch-BN models are each built right after `torch.manual_seed(seed)`, so their
  Linear layers start identical (BatchNorm's init draws no random numbers). The bnfast model is
  `bnfast.convert(copy.deepcopy(torch_bn))`: the same weights, BN -> activation fused into one kernel.
- Same batches. MNIST is small, so each split is loaded once as two tensors on the device (`data / 255`, what
  `ToTensor()` computes) and batches are index slices of a fresh `torch.randperm` per epoch from one seeded
  generator, the last incomplete batch dropped: the sampling of `DataLoader(shuffle=True, drop_last=True)`
  without its per-sample Python overhead (the order itself differs from a DataLoader's: that one also draws a
  worker seed from the generator). Every batch is fed to each model in turn, so all three see the very same
  sequence of batches; none of them draws random numbers while training (no dropout).
- Timing. The models interleave in one loop, so each model's steps are timed separately (with
  `torch.cuda.synchronize()` on CUDA) and summed into its epoch time. Before timing, each model takes one step
  on a throwaway copy, so Triton's JIT compile and CUDA's lazy init are not counted.
- Evaluation. Before training (epoch 0) and after every epoch, in eval mode under no_grad, in batches of
  1000: loss and accuracy on the training split and on the test split ("VALID").
- Evidence that bnfast matches. At the end, the largest absolute differences between the torch-BN and bnfast
  models are printed and stored: weights and running stats, and logits in training and eval mode. The Linear
  biases that feed a BN are reported apart: their gradient is zero in exact arithmetic, so they only carry
  rounding noise, which Adam scales up (see `compare_bn_models`).
- Backend, stated honestly. On CUDA bnfast runs its Triton kernels; on CPU it runs them through Triton's
  interpreter only when TRITON_INTERPRET=1 was set before the import (slow, exact: how CI checks the kernels),
  and otherwise falls back to torch ops. The table and results.json say which.

Data lookup (`--data-dir`, default `data/`): the four original `.gz` files, md5-checked, from
`<data-dir>/MNIST/raw`, else `$BNFAST_MNIST_RAW` or, when that is unset, this repo's `../shared/data/MNIST/raw`,
read directly (no network, no torchvision: the GPU machine has none); else torchvision's MNIST: the files it
reads from `<data-dir>/MNIST/raw`, else its download (with `--download`, the default). If none works, the script
exits with one message naming the folders it searched and which files to put where.

CUDA graphs (`--cuda-graphs`, CUDA only; without CUDA the script exits with a message): every model's whole
training step (forward, loss, backward, Adam with capturable=True) is captured once in a CUDA graph and replayed
per batch (`GraphedStep`), so the timings compare kernels rather than Python. The capture's warm-up steps run
inside `training_state_kept`: weights, running stats and Adam's state are restored afterwards, so no step is
taken that the eager run would not take.

Progress: in a terminal, a tqdm bar per epoch; always one line per epoch when its training ends (steps, seconds
per model), then the evaluation lines, so a log (stdout not a TTY: no bars) still shows each epoch.

Outputs (`--out`, default `runs/mnist-<timestamp>`): results.json (config, versions, device, backend, per model
per epoch: train/valid loss and accuracy, training time and steps per second; the torch-BN vs bnfast
difference) and, unless `--no-plots`, train_loss.png, train_acc.png, valid_loss.png and valid_acc.png, each
titled with the dataset, the device and bnfast's backend, one marker per epoch on integer ticks.
"""

import argparse
import contextlib
import copy
import datetime
import functools
import gzip
import hashlib
import itertools
import json
import os
import platform
import shutil
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import bnfast

MODEL_NAMES = ("no-BN", "torch-BN", "bnfast")
ACTIVATIONS = bnfast.SUPPORTED_ACTIVATIONS  # the one table (kernels/activations.py): all fused by bnfast.convert
ARCHS = ("mlp", "cnn")
EVAL_BATCH_SIZE = 1000  # evaluation only: fewer, larger launches (each one costs milliseconds when interpreted)
IMAGE_SIZE = 28 * 28
NUM_CLASSES = 10
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_RAW_DIR = REPO_ROOT.parent / "shared" / "data" / "MNIST" / "raw"
RAW_DIR_ENV = "BNFAST_MNIST_RAW"
# plot file name -> (history key, title, y label)
PLOTS = {
    "train_loss": ("train_loss", "Training loss (eval mode, after each epoch)", "cross-entropy loss"),
    "train_acc": ("train_acc", "Training accuracy (eval mode, after each epoch)", "accuracy"),
    "valid_loss": ("valid_loss", "Test loss after each epoch", "cross-entropy loss"),
    "valid_acc": ("valid_acc", "Test accuracy after each epoch", "accuracy"),
}
LINE_STYLES = {  # fixed colours per model; bnfast dashed, so that it shows on top of torch-BN
    "no-BN": {"color": "C0", "marker": "o"},
    "torch-BN": {"color": "C1", "marker": "o"},
    "bnfast": {"color": "C2", "marker": "x", "linestyle": "--"},
}
TABLE_COLUMNS = ("model", "backend", "final test acc", "best test acc", "mean epoch s", "time vs torch-BN")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" only where there is a default to show: None ("not set") and a flag's False are
    left to the option's own help text (`--out`'s names its computed default)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an MNIST MLP without BN, with torch.nn.BatchNorm1d and with bnfast on the same batches; "
        "print per-epoch metrics and a summary table, write results.json and plots.",
        formatter_class=HelpFormatter,
        epilog=f"Offline data: put the four MNIST .gz files in <data-dir>/MNIST/raw, or point ${RAW_DIR_ENV} at a "
        "folder holding them. Kernels on CPU: set TRITON_INTERPRET=1 to run bnfast's Triton kernels in the "
        "interpreter (slow); without it bnfast falls back to torch ops on CPU.",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (last partial one dropped)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    parser.add_argument(
        "--arch",
        choices=ARCHS,
        default="mlp",
        help="mlp: the tutorial's 784-H-H-10 MLP (BatchNorm1d); cnn: two 3x3 convolutions (BatchNorm2d)",
    )
    parser.add_argument("--channels-last", action="store_true", help="cnn: run in torch.channels_last memory format")
    parser.add_argument("--hidden", type=int, default=32, help="mlp: width of the two hidden layers")
    parser.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="relu",
        help="activation after each hidden layer: a torch module in the no-BN and torch-BN models, "
        "fused into the BatchNorm kernel in the bnfast model",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for the initial weights and the batch order")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available, else cpu"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="torchvision root: MNIST/raw lives here")
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download MNIST with torchvision when no local copy is found",
    )
    parser.add_argument(
        "--limit-train", type=int, metavar="N", help="use only the first N training images (default: all)"
    )
    parser.add_argument("--limit-test", type=int, metavar="N", help="use only the first N test images (default: all)")
    parser.add_argument(
        "--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES), help="which models to train"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--recalibrate",
        action="store_true",
        help="after training, set each BN model's running stats to the exact statistics of the "
        "training split (bnfast.recalibrate) and report test accuracy before and after",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="CUDA: every model's whole training step (forward, loss, backward, Adam step) "
        "captured in a CUDA graph, replayed per batch: times kernels, not Python",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/mnist-<timestamp>)")
    args = parser.parse_args(argv)
    for option in ("epochs", "batch_size", "hidden", "limit_train", "limit_test"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.out is None:
        args.out = Path("runs") / f"mnist-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    args.models = [name for name in MODEL_NAMES if name in args.models]  # table order, no duplicates
    return args


# ---------------------------------------------------------------------------------------------------- data


def local_sources(raw_dir: Path) -> list[Path]:
    """The folders searched for the .gz files, in order: `raw_dir`, then $BNFAST_MNIST_RAW if set, else the repo's
    shared data folder (the variable replaces that default)."""
    return [raw_dir, Path(os.environ.get(RAW_DIR_ENV) or SHARED_RAW_DIR)]


def missing_data_message(raw_dir: Path, download_error: str | None) -> str:
    """What to do when MNIST is nowhere. `download_error`: why torchvision's download failed, or None when
    --no-download was given (then, and only then, --download is suggested: it is the default)."""
    names = ", ".join(name for name, _ in MNIST_FILES)
    searched, fallback = local_sources(raw_dir)
    label = f"${RAW_DIR_ENV}" if os.environ.get(RAW_DIR_ENV) else f"the repo's shared data, ${RAW_DIR_ENV} unset"
    where = f"searched {searched} and {fallback} ({label})"
    if download_error is None:
        network = "or drop --no-download (downloading is the default) on a machine with internet access"
        reason = "--no-download given"
    else:
        network = "or check this machine's network access and run again"
        reason = f"download failed: {download_error}"
    return (
        f"MNIST not found ({reason}; {where}). Put the four original files ({names}) in {raw_dir}, "
        f"or point ${RAW_DIR_ENV} at a folder holding them, {network}."
    )


def _stage_local_archives(raw_dir: Path) -> None:
    """Make `raw_dir` hold the decompressed files torchvision reads, from verified local .gz files if any.

    Looks for each .gz in the folders of `local_sources`; a copy is taken into `raw_dir` (the sources stay
    read-only). Leaves `raw_dir` as is when a file is missing everywhere: torchvision's download, or the final
    message, deals with that.
    """
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity, extract_archive

    sources = local_sources(raw_dir)
    for name, md5 in MNIST.resources:
        if check_integrity(raw_dir / name.removesuffix(".gz")):  # torchvision's own existence check
            continue
        archive = next((source / name for source in sources if check_integrity(source / name, md5)), None)
        if archive is None:
            return
        if archive.parent != raw_dir:
            raw_dir.mkdir(parents=True, exist_ok=True)
            archive = Path(shutil.copyfile(archive, raw_dir / name))
        extract_archive(str(archive), str(raw_dir))


# the four original files and their md5 (torchvision's MNIST.resources): train images, labels; test images, labels
MNIST_FILES = (
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
)


def _md5_ok(path: Path, md5: str) -> bool:
    return path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() == md5


def read_idx_gz(path: Path) -> torch.Tensor:
    """A gzip-compressed IDX file (MNIST's format: 2 zero bytes, a type byte (0x08: uint8), the number of dims,
    the dims as big-endian uint32, then the data) as a uint8 tensor of those dims."""
    data = gzip.decompress(path.read_bytes())
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not a uint8 IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).view(*dims)


def local_mnist(raw_dir: Path):
    """[(images uint8 (N, 28, 28), labels int64)] for train and test from the md5-verified .gz files of
    `local_sources`, read directly (no torchvision needed: the GPU machine has none); None when any is missing."""
    paths = []
    for name, md5 in MNIST_FILES:
        path = next((source / name for source in local_sources(raw_dir) if _md5_ok(source / name, md5)), None)
        if path is None:
            return None
        paths.append(path)
    tensors = [read_idx_gz(p) for p in paths]
    return [(tensors[0], tensors[1].long()), (tensors[2], tensors[3].long())]


def load_mnist(data_dir: Path, download: bool, device: torch.device):
    """((train_x, train_y), (test_x, test_y)): images as float (N, 784) in [0, 1], labels int64, on `device`.
    The local .gz files when they are there (read directly), else torchvision's MNIST (which downloads)."""
    raw_dir = data_dir / "MNIST" / "raw"
    local = local_mnist(raw_dir)
    if local is not None:  # data / 255 is what ToTensor() does to uint8 images
        return [(x.to(device).float().div(255).view(-1, IMAGE_SIZE), y.to(device)) for x, y in local]
    from urllib.error import URLError

    from torchvision.datasets import MNIST

    _stage_local_archives(raw_dir)
    try:
        splits = [MNIST(str(data_dir), train=train, download=download) for train in (True, False)]
    except (RuntimeError, URLError, OSError) as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        detail = " ".join(dict.fromkeys([lines[0], lines[-1]]))  # torchvision's: "Error downloading <file>:" ... cause
        raise SystemExit(missing_data_message(raw_dir, detail if download else None)) from None
    # data / 255 is what ToTensor() does to uint8 images
    return [(s.data.to(device).float().div(255).view(-1, IMAGE_SIZE), s.targets.to(device)) for s in splits]


# -------------------------------------------------------------------------------------------------- models


def build_mlp(hidden: int, activation: str, batch_norm: bool) -> nn.Sequential:
    """Linear(784, H) -> [BN] -> act -> Linear(H, H) -> [BN] -> act -> Linear(H, 10)."""
    layers, width = [], IMAGE_SIZE
    for _ in range(2):
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(bnfast.resolve_activation(activation).module())  # the plain torch module, e.g. nn.ReLU()
        width = hidden
    layers.append(nn.Linear(hidden, NUM_CLASSES))
    return nn.Sequential(*layers)


class ToChannelsLast(nn.Module):
    """The images (N, 1, 28, 28) in torch.channels_last, so that every convolution and BatchNorm after runs in it."""

    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


def build_cnn(activation: str, batch_norm: bool, channels_last: bool = False) -> nn.Sequential:
    """Conv(1->16, 3) -> [BN2d] -> act -> MaxPool(2) -> Conv(16->32, 3) -> [BN2d] -> act -> MaxPool(2) -> Linear."""
    layers = [nn.Unflatten(1, (1, 28, 28))] + ([ToChannelsLast()] if channels_last else [])
    channels, side = 1, 28
    for width in (16, 32):
        layers.append(nn.Conv2d(channels, width, 3))
        if batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers += [bnfast.resolve_activation(activation).module(), nn.MaxPool2d(2)]
        channels, side = width, (side - 2) // 2
    layers += [nn.Flatten(), nn.Linear(channels * side * side, NUM_CLASSES)]
    return nn.Sequential(*layers)


def build_models(args, device: torch.device) -> dict[str, nn.Module]:
    """The selected models, seeded as described in the module docstring."""

    def build(batch_norm):
        torch.manual_seed(args.seed)
        if args.arch == "cnn":
            return build_cnn(args.activation, batch_norm, args.channels_last)
        return build_mlp(args.hidden, args.activation, batch_norm)

    no_bn, torch_bn = build(False), build(True)
    models = {"no-BN": no_bn, "torch-BN": torch_bn, "bnfast": bnfast.convert(copy.deepcopy(torch_bn))}
    memory_format = torch.channels_last if args.channels_last else torch.preserve_format
    return {name: models[name].to(device, memory_format=memory_format) for name in args.models}


def bnfast_backend(device: torch.device) -> str:
    """What runs bnfast's BatchNorm on `device`: "triton", "interpreter" (Triton on CPU) or "torch fallback"."""
    if not bnfast.uses_triton(torch.empty(0, device=device)):
        return "torch fallback"
    return "triton" if device.type == "cuda" else "interpreter"


def compare_bn_models(torch_bn: nn.Sequential, fused: nn.Sequential, x: torch.Tensor) -> dict:
    """How far apart the torch-BN and bnfast models ended up, as max absolute differences.

    A Linear bias right before a BatchNorm is redundant: BN subtracts the batch mean, so the bias gradient is
    zero in exact arithmetic, and in float32 it is rounding noise that differs between the two implementations.
    Adam divides each step by the gradient's own scale, turning that noise into steps of about lr, in
    unrelated directions in the two models; these biases, and the running means that track them, drift apart
    without changing what the model computes in training mode. So they are reported on their own, the other
    weights and running stats together, and the logits on `x` in training mode (batch statistics: the bias
    cancels) and in eval mode (running means: they lag the bias by a few steps, so a small difference shows).
    """
    redundant = set()
    for (name, module), (following, next_module) in itertools.pairwise(torch_bn.named_children()):
        if isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(next_module, nn.modules.batchnorm._BatchNorm):
            redundant |= {f"{name}.bias", f"{following}.running_mean"}
    fused_state = fused.state_dict()
    diffs = {
        k: (v - fused_state[k]).abs().max().item() for k, v in torch_bn.state_dict().items() if v.is_floating_point()
    }
    kept = {k: d for k, d in diffs.items() if k not in redundant}
    worst = max(kept, key=kept.get)
    result = {
        "max_abs_diff": kept[worst],
        "worst_tensor": worst,
        "redundant_max_abs_diff": max((diffs[k] for k in redundant), default=0.0),
        "redundant_tensors": sorted(redundant),
    }
    with torch.no_grad():
        for mode in ("train", "eval"):  # on copies: a training-mode forward updates the running stats
            a, b = (copy.deepcopy(m).train(mode == "train") for m in (torch_bn, fused))
            result[f"{mode}_mode_logits_max_abs_diff"] = (a(x) - b(x)).abs().max().item()
    return result


# ------------------------------------------------------------------------------------------------ training


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """Index batches (on `device`) of a fresh permutation of range(n), the last incomplete one dropped."""
    order = torch.randperm(n, generator=generator).to(device)  # drawn on the CPU: same order on every device
    return list(order[: n - n % batch_size].split(batch_size))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@contextlib.contextmanager
def training_state_kept(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Inside the block, train as much as needed (warm-up steps before a capture); on exit the model's parameters
    and buffers (BatchNorm's running stats and num_batches_tracked) hold their values from before the block again,
    copied back into the same tensors (a captured graph keeps their addresses), and an optimizer that had no state
    before the block gets its state zeroed: Adam's own initial state (exp_avg = exp_avg_sq = 0, step 0)."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    fresh = not optimizer.state
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved, strict=True):
                t.copy_(value)
            if fresh:
                for state in optimizer.state.values():
                    for value in state.values():
                        if isinstance(value, torch.Tensor):
                            value.zero_()


class GraphedStep:
    """A model's whole training step (forward, cross-entropy, backward, optimizer step) captured once in a CUDA
    graph and replayed per batch: `step(x, y)` copies the batch into the graph's static inputs, replays, and
    returns the graph's loss tensor (read it before the next replay).

    Capture needs warm-up steps on a side stream first (cuBLAS workspaces, the optimizer's lazily created state,
    Triton's compile); they run inside `training_state_kept`, so weights, running stats and the optimizer start
    from where they were: the graphed model trains on exactly the batches the eager one would. Needs an optimizer
    made with capturable=True (Adam's step count then lives on the device)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        warmup_steps: int = 3,
    ):
        self.x, self.y = x.clone(), y.clone()
        with training_state_kept(model, optimizer):
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    train_step(model, optimizer, self.x, self.y)
            torch.cuda.current_stream(x.device).wait_stream(side)
            optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing
                self.loss = F.cross_entropy(model(self.x), self.y)
                self.loss.backward()
                optimizer.step()
        synchronize(x.device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss.detach()


def make_steps(models, optimizers, batch, cuda_graphs: bool) -> dict:
    """name -> step(x, y) -> loss: `train_step` eagerly, or a `GraphedStep` captured on `batch`."""
    if cuda_graphs:
        return {name: GraphedStep(model, optimizers[name], *batch) for name, model in models.items()}
    return {name: functools.partial(train_step, model, optimizers[name]) for name, model in models.items()}


def warm_up(model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step on a throwaway copy: compiles kernels and initialises CUDA without touching `model`."""
    scratch = copy.deepcopy(model)
    train_step(scratch, torch.optim.Adam(scratch.parameters(), lr=lr), x, y)
    synchronize(x.device)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for xb, yb in zip(x.split(EVAL_BATCH_SIZE), y.split(EVAL_BATCH_SIZE), strict=True):
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def evaluate_all(models, train, test) -> dict[str, dict[str, float]]:
    """name -> {train_loss, train_acc, valid_loss, valid_acc}."""
    metrics = {}
    for name, model in models.items():
        train_loss, train_acc = evaluate(model, *train)
        valid_loss, valid_acc = evaluate(model, *test)
        metrics[name] = {
            "train_loss": train_loss,
            "train_acc": train_acc,
            "valid_loss": valid_loss,
            "valid_acc": valid_acc,
        }
    return metrics


def train_epoch(models, steps, train, batch_size, generator, epoch) -> dict[str, dict[str, float]]:
    """One epoch, every batch fed to each model in turn (`steps`: name -> step(x, y), see `make_steps`):
    name -> {train_time_s, steps_per_s, running_loss}.

    A progress bar only in a terminal: in a log (stdout not a TTY) bars are noise; `print_training` reports
    each epoch there instead.
    """
    x, y = train
    batches = shuffled_batches(len(y), batch_size, generator, x.device)
    seconds = dict.fromkeys(models, 0.0)
    loss_sums = {name: torch.zeros((), device=x.device) for name in models}
    bars = sys.stdout.isatty()
    for index in tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not bars, file=sys.stdout):
        xb, yb = x[index], y[index]
        for name, step in steps.items():
            synchronize(x.device)
            start = time.perf_counter()
            loss = step(xb, yb)
            synchronize(x.device)
            seconds[name] += time.perf_counter() - start
            loss_sums[name] += loss  # stays on the device: no sync outside the timed region
    return {
        name: {
            "train_time_s": seconds[name],
            "steps_per_s": len(batches) / seconds[name],
            "running_loss": loss_sums[name].item() / len(batches),
        }
        for name in models
    }


def recalibrate_models(models, train, test, batch_size) -> dict[str, dict[str, float]]:
    """bnfast.recalibrate over the training split (training-size batches) for every model with BatchNorm:
    name -> test accuracy before and after."""
    full = len(train[1]) // batch_size  # the last partial batch dropped, as in training
    batches = list(zip(train[0].split(batch_size)[:full], train[1].split(batch_size)[:full], strict=True))
    out = {}
    for name, model in models.items():
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            continue
        before = evaluate(model, *test)[1]
        bnfast.recalibrate(model, batches)
        out[name] = {"valid_acc_before": before, "valid_acc_after": evaluate(model, *test)[1]}
        print(f"recalibrated {name}: test acc {before:.4f} -> {out[name]['valid_acc_after']:.4f}", flush=True)
    return out


def print_training(epoch: int, epochs: int, timings: dict[str, dict[str, float]], steps: int) -> None:
    """One line per epoch as soon as its training ends: `[Epoch 3/10] 1875 steps | no-BN 2.11 s | ...`."""
    cells = [f"{name} {t['train_time_s']:.2f} s" for name, t in timings.items()]
    print(f"[Epoch {epoch}/{epochs}] {steps} steps | " + " | ".join(cells), flush=True)


def print_epoch(epoch: int, metrics: dict[str, dict[str, float]]) -> None:
    """One line per split: `[Epoch 3-VALID] no-BN loss 0.15321 acc 0.9581 | torch-BN ... | bnfast ...`."""
    for split in ("train", "valid"):
        cells = [f"{name} loss {m[f'{split}_loss']:.5f} acc {m[f'{split}_acc']:.4f}" for name, m in metrics.items()]
        print(f"[Epoch {epoch}-{split.upper()}] " + " | ".join(cells), flush=True)


# ------------------------------------------------------------------------------------------------- outputs


def plot_context(device: torch.device, arch: str = "mlp", channels_last: bool = False) -> str:
    """The second line of every plot title: dataset and model, device, and what ran bnfast."""
    model = arch.upper() + (", channels_last" if channels_last else "")
    return f"MNIST {model} | {device_name(device)} | bnfast: {bnfast_backend(device)}"


def plot_metric(history: dict[str, list[dict]], key: str, title: str, ylabel: str, context: str):
    """One metric over the trained epochs, one line per model, as a matplotlib Figure.

    Epoch 0 (chance level, loss ~2.3) is left out: it would squash the differences that matter into a corner.
    Every epoch is a marker on an integer tick, so that a 1-epoch run still shows readable points.
    """
    from matplotlib.figure import Figure  # not pyplot: files only, no display or backend needed
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, rows in history.items():
        ax.plot([r["epoch"] for r in rows[1:]], [r[key] for r in rows[1:]], label=name, **LINE_STYLES[name])
    last_epoch = max(rows[-1]["epoch"] for rows in history.values())
    ax.set_xlim(0.5, last_epoch + 0.5)  # half an epoch of margin: a single epoch is not squeezed into 1 +- 0.05
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # integers even when only one is in view
    ax.set_title(f"{title}\n{context}", fontsize=10)
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_history(history: dict[str, list[dict]], out_dir: Path, context: str) -> list[Path]:
    """One PNG per metric (`PLOTS`), titled with `context`; returns the paths written."""
    paths = []
    for file_name, (key, title, ylabel) in PLOTS.items():
        paths.append(out_dir / f"{file_name}.png")
        plot_metric(history, key, title, ylabel, context).savefig(paths[-1], dpi=120)
    return paths


def summarize(history: dict[str, list[dict]], backends: dict[str, str]) -> list[dict]:
    """Per model: final and best test accuracy, mean epoch time, time relative to torch-BN."""
    rows = []
    for name, epochs in history.items():
        trained = epochs[1:]  # epoch 0 is the evaluation before training
        rows.append(
            {
                "model": name,
                "backend": backends[name],
                "final_valid_acc": trained[-1]["valid_acc"],
                "best_valid_acc": max(e["valid_acc"] for e in trained),
                "mean_epoch_s": sum(e["train_time_s"] for e in trained) / len(trained),
            }
        )
    reference = next((r["mean_epoch_s"] for r in rows if r["model"] == "torch-BN"), None)
    for row in rows:
        row["time_vs_torch_bn"] = row["mean_epoch_s"] / reference if reference else None
    return rows


def print_table(rows: list[dict]) -> None:
    """The summary as a Markdown table: aligned in a terminal, ready to paste into a README."""
    cells = [TABLE_COLUMNS] + [
        (
            r["model"],
            r["backend"],
            f"{r['final_valid_acc']:.4f}",
            f"{r['best_valid_acc']:.4f}",
            f"{r['mean_epoch_s']:.2f}",
            "-" if r["time_vs_torch_bn"] is None else f"{r['time_vs_torch_bn']:.2f}x",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


def versions() -> dict[str, str | None]:
    import torchvision

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # no Triton wheel on this platform: bnfast uses the torch fallback
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": triton_version,
        "bnfast": bnfast.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    run_start = time.perf_counter()
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )

    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit(
            f"--cuda-graphs: CUDA graphs capture GPU work, and this run's device is {device} "
            "(no CUDA device, or --device cpu)"
        )
    (train_x, train_y), (test_x, test_y) = load_mnist(args.data_dir, args.download, device)
    train = (train_x[: args.limit_train], train_y[: args.limit_train])
    test = (test_x[: args.limit_test], test_y[: args.limit_test])
    if len(train[1]) < args.batch_size:
        raise SystemExit(f"--limit-train {len(train[1])} is smaller than one batch ({args.batch_size})")

    models = build_models(args, device)
    optimizers = {
        name: torch.optim.Adam(model.parameters(), lr=args.lr, capturable=args.cuda_graphs)
        for name, model in models.items()
    }
    backends = {name: bnfast_backend(device) if name == "bnfast" else "torch" for name in models}
    print(
        f"device {device_name(device)} | train {len(train[1])} test {len(test[1])} | backends "
        + ", ".join(f"{name}: {backend}" for name, backend in backends.items()),
        flush=True,
    )

    for model in models.values():
        warm_up(model, args.lr, train[0][: args.batch_size], train[1][: args.batch_size])
    steps = make_steps(models, optimizers, (train[0][: args.batch_size], train[1][: args.batch_size]), args.cuda_graphs)
    generator = torch.Generator().manual_seed(args.seed)
    initial = evaluate_all(models, train, test)
    print_epoch(0, initial)
    history = {
        name: [{"epoch": 0, **initial[name], "train_time_s": None, "steps_per_s": None, "running_loss": None}]
        for name in models
    }
    for epoch in range(1, args.epochs + 1):
        timings = train_epoch(models, steps, train, args.batch_size, generator, epoch)
        print_training(epoch, args.epochs, timings, len(train[1]) // args.batch_size)
        metrics = evaluate_all(models, train, test)
        print_epoch(epoch, metrics)
        for name in models:
            history[name].append({"epoch": epoch, **metrics[name], **timings[name]})

    summary = summarize(history, backends)
    print()
    print_table(summary)
    match = None
    if "torch-BN" in models and "bnfast" in models:
        match = compare_bn_models(models["torch-BN"], models["bnfast"], test[0][:EVAL_BATCH_SIZE])
        print(
            "torch-BN vs bnfast after training, max |difference|: "
            f"weights and running stats {match['max_abs_diff']:.2g} (at {match['worst_tensor']}); "
            f"logits in training mode {match['train_mode_logits_max_abs_diff']:.2g}, "
            f"in eval mode {match['eval_mode_logits_max_abs_diff']:.2g}; "
            f"the redundant pre-BN Linear biases and their running means {match['redundant_max_abs_diff']:.2g} "
            "(rounding noise in a zero gradient, scaled up by Adam: see compare_bn_models)"
        )

    recalibration = recalibrate_models(models, train, test, args.batch_size) if args.recalibrate else None

    args.out.mkdir(parents=True, exist_ok=True)
    context = plot_context(device, args.arch, args.channels_last)
    plots = [] if args.no_plots else plot_history(history, args.out, context)
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": versions(),
        "device": device_name(device),
        "bnfast_backend": bnfast_backend(device),
        "triton_interpret_env": os.environ.get("TRITON_INTERPRET"),
        "num_train": len(train[1]),
        "num_test": len(test[1]),
        "models": history,
        "summary": summary,
        "torch_bn_vs_bnfast": match,
        "recalibrate": recalibration,
        "plots": [p.name for p in plots],
        "total_wall_s": time.perf_counter() - run_start,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}" + (f" and {len(plots)} plots" if plots else ""))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
