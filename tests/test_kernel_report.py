"""The static kernel report in CI (bench/kernel_report.py): no GPU needed, Triton's compiler and ptxas are enough.

One subprocess compiles the `ci` matrix for sm_90, the H200's arch (about 90 s on 2 cores; sm_80 too with
BNFAST_KERNEL_REPORT_ARCHS="80 90", which doubles it: the README's `--matrix bench` figures cover both) WITHOUT
TRITON_INTERPRET
(tests/conftest.py sets it in this process, and interpreted kernels cannot be compiled); the tests read its JSON:
- every configuration compiles (an activation constant that Triton cannot see inside a kernel fails here);
- no configuration spills registers, on the stacks the README names as tested (TESTED_STACKS: torch 2.14 + triton
  3.8, and torch 2.11 + triton 3.6, the GPU machine's); on another stack a spill skips the test with the list,
  which `python -m bench.kernel_report` and the benchmarks report (torch 2.15 + triton 3.9 was reported to spill 4
  bytes in two sm_90 configurations of the kernels before 2026-12-02);
- every configuration the benchmarks time keeps at least 2 CTAs per SM;
- `expect_vec128` configurations (float32, contiguous, fast-axis tile extent >= 4, C resp. L a multiple of 16:
  the rule in bench/kernel_report.py's docstring) load, and store their tiles, 128 bits at a time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not installed with the package; the tests import two of its helpers
    sys.path.insert(0, str(REPO))
# sm_90 only by default, to keep CI's time: sm_80 gave the same verdicts on every ci configuration so far
ARCHS = os.environ.get("BNFAST_KERNEL_REPORT_ARCHS", "90").split()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.kernel_report", "--matrix", "ci", "--arch", *ARCHS, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _describe(row, arch):
    m = row[f"sm{arch}"]
    blocks = "x".join(str(row[k]) for k in ("BLOCK_N", "BLOCK_C", "BLOCK_S") if row[k] is not None)
    detail = m.get("error") or (
        f"regs {m['regs']}, spill {m['spill_stores']}/{m['spill_loads']} B, ld {m['ld_widths']}, st {m['st_widths']}"
    )
    return (
        f"sm{arch} {row['kernel']} {row['mode']} {row['dtype']} {row['activation']} shape "
        f"{'x'.join(map(str, row['example_shape']))} BLOCK {blocks} warps {row['num_warps']}: {detail}"
    )


def test_every_configuration_compiles(report):
    broken = [_describe(r, a) for r in report["rows"] for a in report["archs"] if "error" in r[f"sm{a}"]]
    assert not broken, f"{len(broken)} configurations do not compile:\n" + "\n".join(broken)


# (torch, triton) major.minor stacks the README names as tested, on which no configuration may spill: the ones the
# report was measured on with no spill. Triton brings its own ptxas, so the triton version decides.
TESTED_STACKS = (("2.14", "3.8"), ("2.11", "3.6"))


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def check_spills(spills: list[str], stack: tuple[str, str]) -> None:
    """Fail on any spill on a tested stack; on another stack, skip with what spilled instead of failing."""
    if spills and stack not in TESTED_STACKS:
        pytest.skip(
            f"{len(spills)} configurations spill registers on torch {stack[0]} + triton {stack[1]}, a stack the README "
            "does not name as tested; `python -m bench.kernel_report` lists them (first: " + spills[0] + ")"
        )
    assert not spills, f"{len(spills)} configurations spill registers:\n" + "\n".join(spills)


def test_no_spills(report):
    import torch
    import triton

    spills = [
        _describe(r, a)
        for r in report["rows"]
        for a in report["archs"]
        if "error" not in r[f"sm{a}"] and (r[f"sm{a}"]["spill_stores"] or r[f"sm{a}"]["spill_loads"])
    ]
    check_spills(spills, (_major_minor(torch.__version__), _major_minor(triton.__version__)))


def test_spills_fail_only_on_tested_stacks():
    spill = ["sm90 _bn_grad_partial_kernel train float32 gelu shape 4096x256 BLOCK 8x64 warps 4: regs 255, spill 4/4 B"]
    assert _major_minor("2.15.0+cu130") == "2.15" and _major_minor("3.9.0") == "3.9"
    with pytest.raises(pytest.skip.Exception, match="torch 2.15 \\+ triton 3.9.*bench.kernel_report"):
        check_spills(spill, ("2.15", "3.9"))
    with pytest.raises(AssertionError, match="1 configurations spill"):
        check_spills(spill, ("2.14", "3.8"))
    check_spills([], ("2.15", "3.9"))  # no spill: passes anywhere


def test_benchmarked_configurations_keep_two_ctas_per_sm(report):
    """What the benchmarks time must not run at one CTA per SM (registers, warps, shared memory: `ctas_per_sm`)."""
    from bench.kernel_report import MIN_CTAS_PER_SM

    rows = [r for r in report["rows"] if r["benchmarked"]]
    assert len(rows) >= 50, "the ci matrix lost the benchmarked configurations"
    low = [
        _describe(r, a) + f", {r[f'sm{a}']['ctas_per_sm']} CTAs/SM"
        for r in rows
        for a in report["archs"]
        if "error" not in r[f"sm{a}"] and r[f"sm{a}"]["ctas_per_sm"] < MIN_CTAS_PER_SM
    ]
    assert not low, f"{len(low)} benchmarked configurations below {MIN_CTAS_PER_SM} CTAs per SM:\n" + "\n".join(low)


@pytest.mark.parametrize(
    "regs, warps, smem, arch, expected",
    [
        (128, 8, 0, 90, 2),
        (130, 8, 0, 90, 1),
        (255, 4, 0, 90, 2),
        (32, 4, 0, 90, 16),
        (40, 1, 0, 90, 32),
        (64, 8, 120000, 90, 1),
        (64, 8, 120000, 80, 1),
        (64, 8, 80000, 90, 2),
    ],
)
def test_ctas_per_sm(regs, warps, smem, arch, expected):
    from bench.kernel_report import ctas_per_sm

    assert ctas_per_sm(regs, warps, smem, arch) == expected


def test_approx_instructions_parses_ptx():
    from bench.kernel_report import approx_instructions

    ptx = "ex2.approx.f32 %f1, %f2;\n div.full.f32 %f3, %f1, %f4;\n div.rn.f32 %f5, %f1, %f4;\n ex2.approx.f32 %f6;"
    assert approx_instructions(ptx) == {"ex2.approx.f32": 2, "div.full.f32": 1}


def test_128_bit_accesses_on_aligned_contiguous_float32(report):
    from bench.kernel_report import vec128_ok

    rows = [r for r in report["rows"] if r["expect_vec128"]]
    # the bench shapes alone give 2D fused, 2D split and 3D split float32 configurations in both modes
    assert len(rows) >= 10, "the ci matrix lost its aligned float32 configurations"
    narrow = [
        _describe(r, a) for r in rows for a in report["archs"] if "error" not in r[f"sm{a}"] and not vec128_ok(r, a)
    ]
    assert not narrow, f"{len(narrow)} configurations miss 128-bit tile accesses:\n" + "\n".join(narrow)


def test_report_covers_every_kernel(report):
    from bench.kernel_report import _KERNEL_ORDER

    assert {r["kernel"] for r in report["rows"]} == set(_KERNEL_ORDER)


@pytest.mark.parametrize(
    "ptx, expected",
    [
        ("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];", {"ld": {128: 1}, "st": {}}),
        ("ld.global.L1::evict_last.v2.b64 {%rd2, %rd3}, [%rd1];", {"ld": {128: 1}, "st": {}}),
        ("@%p2 st.global.b16 [ %rd4 + 0 ], { %rs1 };\n ld.global.b32 {%r1}, [%rd1];", {"ld": {32: 1}, "st": {16: 1}}),
    ],
)
def test_access_widths_parses_ptx(ptx, expected):
    from bench.kernel_report import access_widths

    assert access_widths(ptx) == expected
