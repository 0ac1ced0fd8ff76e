"""Static kernel report: every kernel configuration bnfast launches, compiled for sm_80 and sm_90 with no GPU.

    PYTHONPATH=. python -m bench.kernel_report [--matrix ci|default|full] [--arch 80 90] [--jobs N] [--json PATH]

Run it WITHOUT TRITON_INTERPRET (under the interpreter the kernels are not compilable JIT functions).

Which configurations. The launchers enumerate them themselves: `bn_fwd` and `bn_bwd` run on meta tensors (no
memory; data_ptr 0, so 16-byte aligned like any CUDA allocation) with the kernels swapped for recorders (on
`bnfast.kernels.batch_norm`, where the stages look them up), over a MATRICES entry (shapes x layouts x
dtype/activation variants) x {train, eval}, with the SM counts of an A100 (108) and an H100/H200 (132)
(`launch.config_for` reads them through `launch._sm_count`, patched here). Layouts: "contiguous", and for 3-D
shapes "channels_last" (an (N, L, C) tensor transposed to (N, C, L): stride_c = 1, the C-fast tiles).
Every recorded launch goes through
Triton's own JIT binder (`create_function_from_signature` + `JITFunction._pack_args`: the code the runtime runs
before each launch, the same in Triton 3.6 and 3.8), so the signature, the constexprs, the integers
specialised to the constant 1 and the `tt.divisibility=16` hints (aligned pointers, integers divisible by 16)
are exactly what a real launch on that shape compiles. Launches with the same binder key are one
configuration; each is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`.

What is reported per configuration and arch:
- regs: registers per thread; spill: spill stores/loads in bytes; both from ptxas's own `-v` log (the
  CompiledKernel's n_regs/n_spills are only filled in when a GPU loads the binary, so they are not used);
- smem: metadata.shared (bytes; the cross-warp reductions' scratch);
- ld / st: the widest global load / store in the PTX: `ld.global.v4.b32` = 4 x 32 = 128 bits (bf16/fp16
  data travels packed in b32 lanes: 128 bits = 8 values).
- CTAs/SM: resident CTAs per SM from registers, warps and shared memory (`ctas_per_sm`); below 2, one CTA's warps
  alone must hide the memory latency.
- approx: the approximate float instructions in the PTX (`ex2.approx` of tl.exp, `div.full.f32` of float32 `/`):
  what compiled code may round differently from the interpreter. `kernels.activations._div_rn` starts from a
  `div.full.f32` reciprocal that it refines in float64, so its divisions count here although they are exact.

`expect_vec128` marks the configurations that must load and store x-sized tiles 128 bits wide: float32, a
kernel that streams an x tile (all but the two finalize kernels), at least 4 values per thread, and for every
tensor the kernel streams, a unit-stride axis with a tile extent of 4 or more whose extent (C or S) is a
multiple of 16 values: c for (N, C); s for contiguous (N, C, L) and NCHW (S = H*W); for channels-last
(N, C, L) both c (x) and s (y, dy, dx: allocated contiguous, as torch allocates them); c alone for
channels_last 4-D/5-D. The multiple of 16 is what "alignment allows" means for Triton: it only knows that an
integer is divisible by 16 (the `tt.divisibility` hint); with C = 10, say, neither the row starts nor the
bound of the mask are known to fall on 4-value boundaries, so it must load one value at a time.
tests/test_kernel_report.py asserts no spills (on the tested stacks) and 128-bit loads and stores where expected.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import sys
import time

import torch
import triton
import triton.language as tl

from bench.cases import (
    BENCH_SHAPES,
    CHANNELS_LAST_SHAPES,
    GHOST_REPORT_CASES,
    HEAVY_SHAPES,
    LAYOUTS,
    RESNET_SHAPES,
    SYNC_REPORT_SHAPES,
    TEST_SHAPES,
    TYPICAL_SHAPES,
)
from bnfast.activations import SUPPORTED_ACTIVATIONS

SM_COUNTS = (108, 132)  # A100, H100/H200
ARCHS = (80, 90)

# the shapes (bench/cases.py, their one home): the benchmark shapes, the tests' shapes (tests/parity.py), typical
# (N, C) / (N, C, L) uses, where registers peak, ResNet-50's BatchNorm2d shapes at batch 256 (NCHW and
# channels_last), 3-D channels-last ones, SyncBatchNorm's
# (dtype, activation name; "" = none)
CORE_VARIANTS = [("float32", ""), ("float32", "relu"), ("bfloat16", ""), ("bfloat16", "relu")]  # benchmarked
EXTRA_VARIANTS = [("float16", "relu"), ("float64", "relu"), ("bfloat16", "mish"), ("float64", "mish")] + [
    ("float32", act) for act in SUPPORTED_ACTIVATIONS if act != "relu"
]
# backward activations that once spilled a few bytes at full-size tiles
HEAVY_BACKWARD_VARIANTS = [
    ("float32", "gelu"),
    ("float32", "gelu_tanh"),
    ("float32", "tanh"),
    ("float32", "sigmoid"),
    ("bfloat16", "mish"),
]
# matrix -> [(shapes, variants[, layouts[, plan]])] (layouts default to contiguous only; plan, if given, is the
# `bnfast.testing.force_plan` arguments the block is recorded under); a configuration is compiled once however many
# blocks reach it.
# ci (tests/test_kernel_report.py, 2 cores): the benchmarked dtypes on every bench and test shape (vectorisation,
# spills), channels-last (N, C, L) in float32, the heaviest variant (float64 mish: 64-bit values, the longest
# activation) where registers peak, and every activation once (each must compile).
MATRICES = {
    "ci": [
        (BENCH_SHAPES + TEST_SHAPES, [("float32", "relu"), ("bfloat16", "relu")]),
        # every configuration the benchmarks run (the "bench" matrix): no spill, >= 2 CTAs per SM
        (BENCH_SHAPES, CORE_VARIANTS),
        (RESNET_SHAPES, CORE_VARIANTS + [(d, "relu", "residual") for d in ("float32", "bfloat16")], LAYOUTS),
        (CHANNELS_LAST_SHAPES, [("float32", "relu")], ("channels_last",)),
        # BN + add + ReLU (the fused residual) on ResNet shapes, both memory formats
        # SyncBatchNorm's stages (forced split partials, the per-rank merge, the finalize over gathered rows)
        (SYNC_REPORT_SHAPES, [("float32", "", "sync"), ("float64", "", "sync")]),
        # what the tests run under force_plan("split", tile_elements=64): tiny tiles, many splits
        (TEST_SHAPES, [("float32", "relu")], LAYOUTS, ("split", 64)),
        (HEAVY_SHAPES, [("float64", "mish")]),
        ([(32, 32)], [("float32", act) for act in SUPPORTED_ACTIVATIONS]),
        # the backward activations that once spilled a few bytes at full-size tiles (see launch.register_widening)
        (HEAVY_SHAPES + [(67, 5)], HEAVY_BACKWARD_VARIANTS),
        # ghost BatchNorm (the GHOST constexpr: chunk-major grid, per-chunk pointers; the running-stats kernel),
        # the benchmarked case among them, both plans
        (list(GHOST_REPORT_CASES), [("float32", "relu", "ghost")], LAYOUTS),
    ],
    "heavy": [(HEAVY_SHAPES + [(67, 5)], HEAVY_BACKWARD_VARIANTS + [("float64", "mish")])],
    # what the benchmarks run (bench/test_batch_norm.py): the figures the GPU run reports depend on these compiling
    # without spills and with >= 2 CTAs per SM
    "bench": [
        (BENCH_SHAPES, CORE_VARIANTS),
        (RESNET_SHAPES, CORE_VARIANTS + [(d, "relu", "residual") for d in ("float32", "bfloat16")], LAYOUTS),
        (list(GHOST_REPORT_CASES)[:1], [("float32", "relu", "ghost")]),  # bench/test_variants.py's ghost case
    ],
    "default": [
        (BENCH_SHAPES + TEST_SHAPES, CORE_VARIANTS + EXTRA_VARIANTS),
        (CHANNELS_LAST_SHAPES, CORE_VARIANTS, ("channels_last",)),
        (RESNET_SHAPES, CORE_VARIANTS + [(d, "relu", "residual") for d in ("float32", "bfloat16")], LAYOUTS),
    ],
    "full": [
        (BENCH_SHAPES + TEST_SHAPES + TYPICAL_SHAPES, CORE_VARIANTS + EXTRA_VARIANTS, LAYOUTS),
    ],
}
FINALIZE_KERNELS = (  # no x tile
    "_bn_stats_merge_kernel",
    "_bn_stats_finalize_kernel",
    "_bn_grad_finalize_kernel",
    "_bn_running_chunks_kernel",
)
TILE_STORE_KERNELS = ("_bn_fwd_single_kernel", "_bn_normalize_kernel", "_bn_bwd_single_kernel", "_bn_grad_input_kernel")


def _require_jit():
    from bnfast.kernels import launch

    if launch.is_interpreted():
        sys.exit("kernel_report: TRITON_INTERPRET=1 is set; run without it (the kernels must be compilable)")
    return launch


# ---------------------------------------------------------------------------------------------------- enumerate
def _describe(a):
    """A recorded argument in picklable form: tensors become ("tensor", dtype name), tl dtypes their name."""
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype).removeprefix("torch."))
    if isinstance(a, tl.dtype):
        return ("tl", a.name)
    return a


def _meta_input(shape, layout, dtype):
    if layout == "channels_last" and len(shape) == 3:  # (N, L, C) transposed: stride_c = 1
        return torch.empty((shape[0], shape[2], shape[1]), device="meta", dtype=dtype).transpose(1, 2)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)
    return torch.empty(shape, device="meta", dtype=dtype)


def _record_sync_stages(launch, x, mean, rstd, world=3):
    """SyncBatchNorm's forward stages on meta tensors (bnfast/distributed.py): what only it launches."""
    x3, cfg = launch.prepare(x, widen=2 if x.dtype == torch.float64 else 1, split=True)  # as distributed.py does
    part, shift = launch.stats_partial(x3, cfg)
    gathered = torch.empty((world, 4, x3.C), dtype=part.dtype, device=x.device)
    launch.stats_merge(part, shift, out=gathered[0])
    launch.stats_finalize(
        gathered.transpose(0, 1)[:3], gathered[:, 3], mean, rstd, None, None, eps=1e-5, momentum=0.1, cumulative=False
    )


def record_launches(shapes, variants, layouts=("contiguous",), plan=None, sm_counts=SM_COUNTS):
    """[(kernel name, args, kwargs, context)] of every launch bn_fwd/bn_bwd make on these cases (meta tensors),
    under `force_plan(*plan)` when a plan is given."""
    from bnfast.testing import force_plan
    from bnfast.testing import record_launches as recording

    launch = _require_jit()
    saved_sm_count = launch._sm_count
    out = []
    try:
        for sms, shape, layout, variant in itertools.product(sm_counts, shapes, layouts, variants):
            dtype_name, act, *extra = variant
            if layout == "channels_last" and len(shape) < 3:
                continue
            launch._sm_count = lambda device, sms=sms: sms
            dtype = getattr(torch, dtype_name)
            C = shape[1]
            x = _meta_input(shape, layout, dtype)
            residual = torch.empty_like(x) if "residual" in extra else None
            chunk = GHOST_REPORT_CASES[shape] if "ghost" in extra else None  # ghost BatchNorm: samples per chunk
            w, b, rm, rv = (torch.empty(C, device="meta", dtype=dtype) for _ in range(4))
            for training in (True, False):
                with recording() as log, force_plan(*plan) if plan else contextlib.nullcontext():
                    y, mean, rstd = launch.bn_fwd(
                        x,
                        w,
                        b,
                        rm,
                        rv,
                        None,
                        training=training,
                        momentum=0.1,
                        cumulative=False,
                        eps=1e-5,
                        activation=act,
                        act_param=0.0,
                        residual=residual,
                        chunk=chunk,
                    )
                    saved = (mean, rstd) if training else (rm, rv)
                    launch.bn_bwd(
                        torch.empty_like(y),
                        x,
                        w,
                        b,
                        *saved,
                        training=training,
                        eps=1e-5,
                        activation=act,
                        act_param=0.0,
                        residual=residual,
                        needs_dr=residual is not None,
                        chunk=chunk,
                    )
                    if "sync" in extra and training:
                        _record_sync_stages(launch, x, mean, rstd)
                for name, _grid, args, kwargs in log:
                    mode = "train" if training else "eval"
                    ctx = dict(
                        shape=shape,
                        layout=layout,
                        dtype=dtype_name,
                        mode=mode,
                        sms=sms,
                        activation=(act or "none")
                        + ("+residual" if residual is not None else "")
                        + (f"+ghost{chunk}" if chunk else ""),
                        plan=plan[0] if plan else "auto",
                    )
                    out.append(
                        (name, tuple(_describe(a) for a in args), {k: _describe(v) for k, v in kwargs.items()}, ctx)
                    )
    finally:
        launch._sm_count = saved_sm_count
    return out


# ------------------------------------------------------------------------------------------------------ compile
class _ArgTensor:
    """What the JIT binder needs of a tensor argument: dtype and a (16-byte aligned) data_ptr."""

    def __init__(self, dtype):
        self.dtype = dtype

    @staticmethod
    def data_ptr():
        return 0


def _materialize(args, kwargs):
    def one(a):
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "tensor":
            return _ArgTensor(getattr(torch, a[1]))
        if isinstance(a, tuple) and len(a) == 2 and a[0] == "tl":
            return tl.dtype(a[1])
        return a

    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}


def _bind(kernel, args, kwargs, target):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run computes them before compiling."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug
    if hasattr(triton.knobs.compilation, "instrumentation_mode"):  # Triton >= 3.6
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _kernel(name):
    from bnfast.kernels import batch_norm

    kernel = getattr(batch_norm, name)
    assert isinstance(kernel, triton.runtime.jit.JITFunction), f"{name} is not a JIT function (still recording?)"
    return kernel


def config_key(name, args, kwargs):
    """The compile identity of a launch: kernel + binder output (target-independent)."""
    from triton.backends.compiler import GPUTarget

    a, k = _materialize(args, kwargs)
    signature, constexprs, attrs, options = _bind(_kernel(name), a, k, GPUTarget("cuda", 90, 32))
    return repr(
        (
            name,
            sorted(signature.items()),
            sorted(constexprs.items()),
            sorted(attrs.items()),
            options.num_warps,
            options.num_stages,
        )
    )


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}
_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")


def access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """{"ld": {bits: count}, "st": {bits: count}} over the PTX's global loads and stores."""
    out = {"ld": {}, "st": {}}
    for op, suffix in _GLOBAL_ACCESS.findall(ptx):
        parts = suffix.strip(".").split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((int(m.group(1)) for p in reversed(parts) if (m := re.fullmatch(r"[bfsu](\d+)", p))), None)
        if bits is not None:
            out[op][vec * bits] = out[op].get(vec * bits, 0) + 1
    return out


# per-SM limits of the two archs (CUDA occupancy calculator): registers, threads, CTAs, shared memory (bytes)
SM_LIMITS = {
    80: dict(regs=65536, threads=2048, ctas=32, smem=167936),
    90: dict(regs=65536, threads=2048, ctas=32, smem=233472),
}
MIN_CTAS_PER_SM = 2  # below this a kernel's latency is hidden by one CTA's warps alone
# approximate instructions in compiled code (the interpreter computes in IEEE numpy): what the GPU may round
# differently from the CPU tests
_APPROX = re.compile(
    r"\b(div\.full\.f32|div\.approx\.f32|ex2\.approx(?:\.ftz)?\.f32|lg2\.approx(?:\.ftz)?\.f32|"
    r"rsqrt\.approx(?:\.ftz)?\.f(?:32|64)|sqrt\.approx(?:\.ftz)?\.f32|rcp\.approx(?:\.ftz)?\.f(?:32|64)|"
    r"tanh\.approx\.f32|sin\.approx(?:\.ftz)?\.f32|cos\.approx(?:\.ftz)?\.f32)\b"
)


def ctas_per_sm(regs: int, num_warps: int, smem: int, arch: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256, at most 64 warps (2048 threads) and 32
    CTAs per SM, and shared memory per CTA plus 1 KiB the driver reserves."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // num_warps
    by_threads = lim["threads"] // (32 * num_warps)
    by_smem = lim["smem"] // (smem + 1024) if smem else lim["ctas"]
    return min(by_regs, by_threads, by_smem, lim["ctas"])


def approx_instructions(ptx: str) -> dict[str, int]:
    """{instruction: count} of the approximate arithmetic in the PTX (see _APPROX)."""
    found = {}
    for name in _APPROX.findall(ptx):
        found[name] = found.get(name, 0) + 1
    return found


def compile_one(job):
    """Worker: compile one configuration for one arch; returns the measured properties."""
    name, args, kwargs, arch = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and with it the -v log
    triton.knobs.nvidia.dump_ptxas_log = True
    target = GPUTarget("cuda", arch, 32)
    kernel = _kernel(name)
    a, k = _materialize(args, kwargs)
    signature, constexprs, attrs, options = _bind(kernel, a, k, target)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas log when dump_ptxas_log is set
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as e:  # reported, not raised: one broken configuration must not hide the others
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        return {"error": f"{type(e).__name__}: {type(root).__name__}: {str(root).splitlines()[-1][:300]}"}
    seconds = time.perf_counter() - start
    found = {key: rx.search(log.getvalue()) for key, rx in _PTXAS_RE.items()}
    if found["regs"] is None:
        raise RuntimeError(f"{name} sm_{arch}: no ptxas -v log captured:\n{log.getvalue()[-2000:]}")
    widths = access_widths(compiled.asm["ptx"])
    regs, smem = int(found["regs"].group(1)), int(compiled.metadata.shared)
    return {
        **{key: int(m.group(1)) if m else 0 for key, m in found.items()},
        "smem": smem,
        "ctas_per_sm": ctas_per_sm(regs, kwargs.get("num_warps", 4), smem, arch),
        "approx": approx_instructions(compiled.asm["ptx"]),
        "ld": max(widths["ld"], default=0),
        "st": max(widths["st"], default=0),
        "ld_widths": widths["ld"],
        "st_widths": widths["st"],
        "compile_s": round(seconds, 3),
    }


# ------------------------------------------------------------------------------------------------------- report
def expects_vec128(name, shape, dtype, kwargs, layout="contiguous") -> bool:
    """The rule stated in the module docstring."""
    if dtype != "float32" or name in FINALIZE_KERNELS:
        return False
    tile = kwargs["BLOCK_N"] * kwargs["BLOCK_C"] * kwargs["BLOCK_S"]
    if tile < 4 * 32 * kwargs.get("num_warps", 4):  # fewer than 4 values per thread (the tests' forced tiny tiles)
        return False
    c_ok = kwargs["BLOCK_C"] >= 4 and shape[1] % 16 == 0
    if len(shape) == 2:
        return c_ok
    s_ok = kwargs["BLOCK_S"] >= 4 and math.prod(shape[2:]) % 16 == 0
    if layout != "channels_last":
        return s_ok
    return c_ok and (s_ok or len(shape) > 3)  # 4-D/5-D channels_last: y and dx are channels_last too


def benchmarked(ctx) -> bool:
    """A launch of a case the benchmarks time (bench/test_batch_norm.py): its configuration must compile without
    spills and keep >= MIN_CTAS_PER_SM CTAs per SM."""
    if ctx["plan"] != "auto" or ctx["dtype"] not in ("float32", "bfloat16"):
        return False
    shape = tuple(ctx["shape"])
    ghost_shape, ghost_chunk = next(iter(GHOST_REPORT_CASES.items()))  # bench/test_variants.py's ghost case
    if shape == ghost_shape and ctx["activation"] == f"relu+ghost{ghost_chunk}":
        return ctx["dtype"] == "float32"
    return shape in BENCH_SHAPES + RESNET_SHAPES and ctx["activation"] in ("none", "relu", "relu+residual")


def build_configs(matrix: str):
    """Distinct configurations: [{kernel, key, args, kwargs, context of the first launch that needed it}]."""
    configs = {}
    launches = [launch for block in MATRICES[matrix] for launch in record_launches(*block)]
    for name, args, kwargs, ctx in launches:
        key = config_key(name, args, kwargs)
        if key not in configs:
            configs[key] = dict(kernel=name, args=args, kwargs=kwargs, **ctx)
        # a config reached from an aligned shape is reported with that shape (the strongest expectation)
        elif not configs[key].get("_vec") and expects_vec128(name, ctx["shape"], ctx["dtype"], kwargs, ctx["layout"]):
            configs[key].update(args=args, kwargs=kwargs, **ctx)
        c = configs[key]
        c["_vec"] = expects_vec128(name, c["shape"], c["dtype"], kwargs, c["layout"])
        c["_bench"] = c.get("_bench", False) or benchmarked(ctx)
    return list(configs.values())


def run(matrix="ci", archs=ARCHS, jobs=None):
    """Compile every configuration for every arch; returns the report as a dict (rows + environment)."""
    start = time.perf_counter()
    configs = build_configs(matrix)
    jobs = jobs or os.cpu_count() or 1
    work = [(c["kernel"], c["args"], c["kwargs"], arch) for c in configs for arch in archs]
    if jobs == 1:
        results = list(map(compile_one, work))
    else:  # spawn: a fresh interpreter per worker (no forked Triton/torch state)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = list(pool.map(compile_one, work, chunksize=4))
    rows = []
    for i, c in enumerate(configs):
        kw = c["kwargs"]
        row = {
            "kernel": c["kernel"],
            "mode": c["mode"],
            "dtype": c["dtype"],
            "activation": c["activation"],
            "example_shape": list(c["shape"]),
            "plan": c["plan"],
            "layout": c["layout"],
            "sms": c["sms"],
            "BLOCK_N": kw.get("BLOCK_N"),
            "BLOCK_C": kw.get("BLOCK_C"),
            "BLOCK_S": kw.get("BLOCK_S"),
            "BLOCK_SPLITS": kw.get("BLOCK_SPLITS"),
            "num_warps": kw.get("num_warps", 4),
            "constexprs": {k: v for k, v in kw.items() if k.isupper() and not k.startswith("BLOCK")},
            "expect_vec128": c["_vec"],
            "benchmarked": c["_bench"],
        }
        for j, arch in enumerate(archs):
            row[f"sm{arch}"] = results[i * len(archs) + j]
        rows.append(row)
    rows.sort(
        key=lambda r: (_KERNEL_ORDER.index(r["kernel"]), r["dtype"], r["activation"], r["mode"], r["example_shape"])
    )
    return {
        "matrix": matrix,
        "archs": list(archs),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": _ptxas_version(),
        "configurations": len(configs),
        "compiles": len(work),
        "jobs": jobs,
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


_KERNEL_ORDER = [
    "_bn_fwd_single_kernel",
    "_bn_stats_partial_kernel",
    "_bn_stats_merge_kernel",
    "_bn_stats_finalize_kernel",
    "_bn_running_chunks_kernel",
    "_bn_normalize_kernel",
    "_bn_bwd_single_kernel",
    "_bn_grad_partial_kernel",
    "_bn_grad_finalize_kernel",
    "_bn_grad_input_kernel",
]


def _ptxas_version():
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        text = str(get_ptxas_version())
        m = re.search(r"release (\d+\.\d+)", text)
        return m.group(1) if m else text.strip().splitlines()[-1]
    except Exception as e:  # informative only
        return f"unknown ({type(e).__name__})"


def format_brief(report) -> str:
    """Markdown table grouped by kernel, dtype and activation: configurations, register range, worst spill,
    widest load/store seen (over all configurations: aligned or not), and the expect_vec128 verdict."""
    archs = report["archs"]
    groups = {}
    for r in report["rows"]:
        groups.setdefault((r["kernel"], r["dtype"], r["activation"]), []).append(r)
    head = ["kernel", "dtype", "act", "configs"]
    for arch in archs:
        head += [f"sm{arch} regs", "min CTAs/SM", "max spill st/ld", "ld max", "st max", "vec128"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype, act), rows in groups.items():
        cells = [kernel.removeprefix("_bn_").removesuffix("_kernel"), dtype, act, str(len(rows))]
        for arch in archs:
            ms = [r[f"sm{arch}"] for r in rows]
            ok = [m for m in ms if "error" not in m]
            if not ok:
                cells += ["COMPILE ERROR", "", "", "", "", ""]
                continue
            regs = sorted(m["regs"] for m in ok)
            spill = max(ok, key=lambda m: m["spill_stores"] + m["spill_loads"])
            vec = [vec128_ok(r, arch) for r in rows if r["expect_vec128"] and "error" not in r[f"sm{arch}"]]
            cells += [
                f"{regs[0]}-{regs[-1]}" + (f" ({len(ms) - len(ok)} errors)" if len(ok) < len(ms) else ""),
                str(min(m["ctas_per_sm"] for m in ok)),
                _fmt_spill(spill),
                f"{max(m['ld'] for m in ok)}b",
                f"{max(m['st'] for m in ok)}b",
                f"{sum(vec)}/{len(vec)}" if vec else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spills(m) -> bool:
    return bool(m.get("spill_stores") or m.get("spill_loads"))


def _fmt_spill(m):
    return f"{m['spill_stores']}/{m['spill_loads']}B" if _spills(m) else "0"


def format_table(report) -> str:
    """Markdown table: one row per configuration, one column group per arch."""
    archs = report["archs"]
    head = ["kernel", "mode", "dtype", "act", "example", "BLOCK N x C x S", "warps"]
    for arch in archs:
        head += [f"sm{arch} regs", "CTAs/SM", "spill", "smem", "ld", "st", "approx"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        blocks = "x".join(str(r[k]) for k in ("BLOCK_N", "BLOCK_C", "BLOCK_S") if r[k] is not None)
        blocks = blocks or f"{r['BLOCK_SPLITS']} splits x {r['BLOCK_C']}"
        cells = [
            r["kernel"].removeprefix("_bn_").removesuffix("_kernel"),
            r["mode"],
            r["dtype"],
            r["activation"],
            "x".join(map(str, r["example_shape"])) + ("" if not r["expect_vec128"] else " *"),
            blocks,
            str(r["num_warps"]),
        ]
        for arch in archs:
            m = r[f"sm{arch}"]
            if "error" in m:
                cells += ["COMPILE ERROR", "", "", "", "", "", ""]
            else:
                cells += [
                    str(m["regs"]),
                    str(m["ctas_per_sm"]),
                    _fmt_spill(m),
                    str(m["smem"]),
                    f"{m['ld']}b",
                    f"{m['st']}b",
                    " ".join(sorted(m["approx"])) or "-",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(report) -> list[str]:
    rows = report["rows"]
    out = [
        f"{report['configurations']} configurations x {len(report['archs'])} archs = {report['compiles']} compiles "
        f"in {report['seconds']} s ({report['jobs']} processes); triton {report['triton']}, ptxas {report['ptxas']}",
        "* = expect_vec128 (float32, contiguous, fast-axis extent a multiple of 16): 128-bit tile loads/stores due",
    ]
    for arch in report["archs"]:
        ms = [r[f"sm{arch}"] for r in rows]
        errors = [r for r in rows if "error" in r[f"sm{arch}"]]
        spills = [r for r in rows if _spills(r[f"sm{arch}"])]
        narrow = [r for r in rows if r["expect_vec128"] and "error" not in r[f"sm{arch}"] and not vec128_ok(r, arch)]
        low = [r for r in rows if "error" not in r[f"sm{arch}"] and r[f"sm{arch}"]["ctas_per_sm"] < MIN_CTAS_PER_SM]
        approx = {}
        for m in ms:
            for name, count in m.get("approx", {}).items():
                approx[name] = approx.get(name, 0) + count
        out.append(
            f"sm{arch}: max regs {max(m.get('regs', 0) for m in ms)}; {len(errors)} configurations fail to compile, "
            f"{len(spills)} spill, {len(low)} below {MIN_CTAS_PER_SM} CTAs per SM (min "
            f"{min((m['ctas_per_sm'] for m in ms if 'error' not in m), default=0)}), {len(narrow)} of "
            f"{sum(r['expect_vec128'] for r in rows)} expected-128-bit ones are narrower; approximate instructions: "
            + (", ".join(f"{k} x{v}" for k, v in sorted(approx.items())) or "none")
        )
        distinct = {}
        for r in errors:
            distinct.setdefault(r[f"sm{arch}"]["error"], set()).add(f"{r['dtype']} {r['activation']}")
        for error, variants in distinct.items():
            out.append(f"  compile error in {', '.join(sorted(variants))}: {error}")
    return out


def vec128_ok(row, arch) -> bool:
    m = row[f"sm{arch}"]
    return "error" not in m and m["ld"] >= 128 and (row["kernel"] not in TILE_STORE_KERNELS or m["st"] >= 128)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--matrix",
        choices=list(MATRICES),
        default="default",
        help="ci: bench + test shapes, 3 dtype/activation pairs; default: all pairs; full: "
        "default + typical (N, C) and (N, C, L) shapes",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="CUDA compute capabilities")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout)")
    parser.add_argument("--brief", action="store_true", help="one row per kernel, dtype and activation")
    args = parser.parse_args(argv)
    report = run(args.matrix, tuple(args.arch), args.jobs)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        return
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(format_brief(report) if args.brief else format_table(report))
    print()
    print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
