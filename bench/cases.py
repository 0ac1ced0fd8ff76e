"""The one home of the benchmark and kernel-report shapes, the benchmark cases, their ids, and which run takes which.

Imports torch only (no bnfast): bench/conftest.py parametrizes from it, bench/kernel_report.py reads its shapes,
tests/test_headline.py holds the headline selection to the cases the GPU issue asks for.

Sets (`pytest bench --bench-set NAME`, bench/conftest.py; bash bench/run_gpu.sh picks them):
- "headline": what `bash bench/run_gpu.sh` times in one call (issue 17): fwd+bwd BN+ReLU, bnfast vs eager vs
  torch.compile, on HEADLINE_CASES; the MNIST step on MNIST_HEADLINE_CONFIGS, every model; no SyncBatchNorm, no
  host-overhead benchmark and no BatchNorm variant (masked: VARIANT_CASES).
- "rest": everything of "full" that "headline" does not time (`bash bench/run_gpu.sh --full`, a second call);
- "full": all of it (the default of `pytest bench --benchmark-only`);
- "smoke": what `--benchmark-disable` runs (any set): each body once on tiny shapes (CI, under the interpreter).

Ids: a BatchNorm case is `<mode>-<activation>-<dtype>-<N>x<C>[x...][-channels_last][-add]`, and its benchmark
`test_batch_norm[<case id>-<provider>]`; an MNIST one `test_mnist_step[batch<B>-hidden<H>-<model>]`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from bench.traffic import MODES, min_bytes, standalone_bytes

SETS = ("headline", "rest", "full", "smoke")

# ------------------------------------------------------------------------------------------ BatchNorm benchmarks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ACTIVATIONS = ("relu", "none")
LAYOUTS = ("contiguous", "channels_last")
PROVIDERS = ("bnfast", "eager", "compile")
# BatchNorm1d: launch-bound (32, 32) (the MNIST layer) up to 128 MiB float32 tensors; (N, C, L) ones
BENCH_SHAPES = [
    (32, 32),
    (256, 1024),
    (4096, 256),
    (16384, 1024),
    (65536, 512),
    (262144, 64),
    (64, 256, 1024),
    (8192, 64, 128),
]
# ResNet-50's BatchNorm2d shapes at batch 256
RESNET_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 512, 28, 28), (256, 2048, 7, 7)]
SMOKE_SHAPES = [(8, 4), (2, 4, 5)]  # --benchmark-disable: tiny (N, C) and (N, C, L), once under the interpreter
SMOKE_2D_SHAPES = [(2, 4, 3, 5)]
SYNC_SHAPES = [(32, 32), (4096, 256), (16384, 1024), (64, 256, 1024)]  # bench/test_sync_batch_norm.py


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str  # one of traffic.MODES
    activation: str  # "none" or a bnfast activation name
    dtype: str  # key of DTYPES
    shape: tuple
    layout: str = "contiguous"  # or "channels_last" (4-D/5-D)
    residual: bool = False  # act(BN(x) + residual): the ResNet block tail

    @property
    def id(self) -> str:
        extra = ("-channels_last" if self.layout == "channels_last" else "") + ("-add" if self.residual else "")
        return f"{self.mode}-{self.activation}-{self.dtype}-{shape_id(self.shape)}{extra}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def min_bytes(self) -> int:
        return min_bytes(self.mode, self.shape, self.element_size, residual=self.residual)

    def standalone_bytes(self) -> int:
        return standalone_bytes(self.mode, self.shape, self.element_size, residual=self.residual)


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def _bn_relu(dtype, shape, layout="contiguous", residual=False) -> Case:
    return Case("fwd+bwd", "relu", dtype, shape, layout, residual)


# the headline: fwd+bwd BN+ReLU, bnfast vs eager vs torch.compile (issue 17), in run order
HEADLINE_CASES = [
    _bn_relu("float32", (32, 32)),  # launch-bound: the MNIST layer
    _bn_relu("float32", (4096, 256)),  # 4 MiB: L2-resident
    _bn_relu("float32", (65536, 512)),  # 128 MiB
    _bn_relu("bfloat16", (65536, 512)),
    _bn_relu("float32", (256, 256, 56, 56)),  # ResNet-50's layer1 BN at batch 256: 784 MiB in float32
    _bn_relu("bfloat16", (256, 256, 56, 56)),
    _bn_relu("float32", (256, 256, 56, 56), "channels_last"),
    _bn_relu("bfloat16", (256, 256, 56, 56), "channels_last"),
    _bn_relu("float32", (256, 256, 56, 56), residual=True),  # BN + add + ReLU: the bottleneck's tail
]


def full_cases() -> list[Case]:
    """The whole matrix, most wanted first (a run cut short keeps them): fwd+bwd BN+ReLU on every 1-D shape and
    dtype, then BatchNorm2d on ResNet-50's shapes (BN+ReLU and BN+add+ReLU, NCHW and channels_last, both dtypes),
    then fwd+bwd without activation, then the forward-only modes."""
    assert sorted(("fwd+bwd", "fwd-train", "fwd-eval")) == sorted(MODES)
    first = [Case("fwd+bwd", "relu", d, s) for d in DTYPES for s in BENCH_SHAPES]
    resnet = [
        Case("fwd+bwd", "relu", d, s, layout, residual)
        for residual in (False, True)
        for layout in LAYOUTS
        for d in DTYPES
        for s in RESNET_SHAPES
    ]
    no_act = [Case("fwd+bwd", "none", d, s) for d in DTYPES for s in BENCH_SHAPES]
    forward = [
        Case(m, a, d, s) for m in ("fwd-train", "fwd-eval") for d in DTYPES for a in ACTIVATIONS for s in BENCH_SHAPES
    ]
    return first + resnet + no_act + forward


def smoke_cases() -> list[Case]:
    """Every mode x dtype x activation on the smoke shapes, and the 2-D BN+ReLU / BN+add+ReLU cases."""
    one_d = [
        Case(m, a, d, s)
        for m in ("fwd+bwd", "fwd-train", "fwd-eval")
        for d in DTYPES
        for a in ACTIVATIONS
        for s in SMOKE_SHAPES
    ]
    two_d = [
        Case("fwd+bwd", "relu", d, s, layout, residual)
        for residual in (False, True)
        for layout in LAYOUTS
        for d in DTYPES
        for s in SMOKE_2D_SHAPES
    ]
    return one_d + two_d


def bn_cases(bench_set: str) -> list[Case]:
    """The BatchNorm cases of a set, in run order (bench/test_batch_norm.py; providers innermost)."""
    if bench_set == "smoke":
        return smoke_cases()
    if bench_set == "headline":
        return list(HEADLINE_CASES)
    full = full_cases()
    return full if bench_set == "full" else [c for c in full if c not in HEADLINE_CASES]


# --------------------------------------------------------------------------------------------- MNIST training step
MNIST_MODELS = ("no-BN", "torch-BN", "bnfast", "no-BN+graph", "torch-BN+graph", "bnfast+graph")
MNIST_CONFIGS = [(32, 32), (256, 32), (1024, 32), (32, 1024), (256, 1024), (1024, 1024)]  # (batch, hidden)
MNIST_HEADLINE_CONFIGS = [(32, 32), (1024, 1024)]  # the reference (launch-bound) and the largest
MNIST_SMOKE_CONFIGS = [(8, 8)]


def mnist_params(bench_set: str) -> list[tuple[int, int, str]]:
    """(batch, hidden, model), models innermost (side by side)."""
    configs = {
        "smoke": MNIST_SMOKE_CONFIGS,
        "headline": MNIST_HEADLINE_CONFIGS,
        "full": MNIST_CONFIGS,
        "rest": [c for c in MNIST_CONFIGS if c not in MNIST_HEADLINE_CONFIGS],
    }[bench_set]
    return [(b, h, m) for b, h in configs for m in MNIST_MODELS]


def mnist_id(batch, hidden, model) -> str:
    return f"batch{batch}-hidden{hidden}-{model}"


# ---------------------------------------------------------------------- BatchNorm variants (bench/test_variants.py)
# bnfast's variant of BN+ReLU fwd+bwd vs the torch snippet users write for it today (bench/variants.py), issue 22.
# Not in the headline (issue 17's cases and time budget): the "rest" / "full" sets (`bash bench/run_gpu.sh --full`).
@dataclasses.dataclass(frozen=True)
class VariantCase:
    variant: str  # a key of bench/variants.py VARIANTS: "masked" or "ghost"
    dtype: str  # key of DTYPES
    shape: tuple  # masked: (N, C, L); ghost: any BatchNorm input
    chunk: int = 0  # ghost: the virtual batch size G

    @property
    def id(self) -> str:
        name = f"ghost{self.chunk}" if self.variant == "ghost" else self.variant
        return f"{name}-fwd+bwd-relu-{self.dtype}-{shape_id(self.shape)}"

    @property
    def base(self) -> Case:
        """The plain BN+ReLU fwd+bwd case of the same shape (bytes, input rotation)."""
        return Case("fwd+bwd", "relu", self.dtype, self.shape)

    def min_bytes(self) -> int:
        """BN+ReLU fwd+bwd's floor (bench/traffic.py), plus one read of the (N, L) bool mask when masked (ghost
        BatchNorm moves the same bytes as BatchNorm)."""
        if self.variant != "masked":
            return self.base.min_bytes()
        N, _, L = self.shape
        return self.base.min_bytes() + N * L


VARIANT_PROVIDERS = ("bnfast", "snippet")
# masked: a speech-sized conv-module activation (batch 32, 512 channels, 1024 frames; 64 MiB in float32), lengths
# uniform in [L/4, L]; ghost: TabNet's large-batch setting (batch 16384, virtual batches of 512: 32 chunks; 16 MiB)
VARIANT_CASES = [
    VariantCase("masked", "float32", (32, 512, 1024)),
    VariantCase("ghost", "float32", (16384, 256), chunk=512),
]
VARIANT_SMOKE_CASES = [VariantCase("masked", "float32", (3, 4, 6)), VariantCase("ghost", "float32", (10, 4), chunk=4)]


def variant_cases(bench_set: str) -> list[VariantCase]:
    return {"smoke": VARIANT_SMOKE_CASES, "headline": [], "rest": VARIANT_CASES, "full": VARIANT_CASES}[bench_set]


# ------------------------------------------------------------------------------ SyncBatchNorm and host overhead
def sync_shapes(bench_set: str) -> list[tuple]:
    return {"smoke": SMOKE_SHAPES, "headline": [], "rest": SYNC_SHAPES, "full": SYNC_SHAPES}[bench_set]


HOST_OVERHEAD_SHAPE = (32, 32)  # the MNIST layer (bench/test_host_overhead.py)


def host_overhead_runs(bench_set: str) -> bool:
    return bench_set != "headline"


# ------------------------------------------------------------------------------------ kernel report (no GPU)
# the tests' shapes (tests/parity.py SHAPES)
TEST_SHAPES = [(2, 3), (32, 32), (67, 5), (2, 3, 7), (1, 8, 300), (130, 40, 3)]
# typical (N, C) and (N, C, L) uses
TYPICAL_SHAPES = [(n, c) for n in (16, 128, 1024, 8192) for c in (10, 64, 512, 4096)] + [
    (4, 16, 50),
    (4, 16, 4096),
    (32, 128, 256),
    (8, 3, 1000),
    (256, 32, 16),
    (2, 512, 64),
]
# the largest tile per thread of each plan and layout (single-pass (N, C); split (N, C) and (N, C, L)): where
# registers peak
HEAVY_SHAPES = [(256, 1024), (4096, 256), (64, 256, 1024), (8192, 64, 128)]
# 3-D shapes also compiled in the channels-last layout (stride_c = 1): aligned (C, L multiples of 16) and odd ones
CHANNELS_LAST_SHAPES = [(64, 256, 1024), (8192, 64, 128), (2, 3, 7), (130, 40, 3), (4, 64, 48)]
# SyncBatchNorm's stages in the report
SYNC_REPORT_SHAPES = [(32, 32), (8, 64, 128)]
# ghost BatchNorm in the report: shape -> samples per chunk (the benchmarked case first; a single-pass (N, C) chunk,
# a split (N, C, L) one, a channels_last-able 3-D one)
GHOST_REPORT_CASES = {(16384, 256): 512, (4096, 64): 128, (64, 256, 1024): 8, (130, 40, 3): 32}

# -------------------------------------------------------------------------------- GPU sanity check (bench/sanity.py)
# fwd+bwd through bnfast before anything is timed, in its own process: both launch plans ((32, 32) is single-pass,
# (65536, 512) split), bfloat16 channels_last 4-D, and the residual; configurations the headline benchmarks compile
# anyway (Triton's cache serves them there)
SANITY_CASES = [HEADLINE_CASES[0], HEADLINE_CASES[2], HEADLINE_CASES[7], HEADLINE_CASES[8]]
