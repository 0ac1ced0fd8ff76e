"""The C++ autograd node of the eager entry: built from bnfast/csrc/autograd_node.cpp at first use, cached, loaded.

Why: a layer of the MNIST model computes for ~3 us on a GPU, so its step time is host time, and
torch.autograd.Function's own bookkeeping per forward+backward (the "autograd floor" of bench/test_host_overhead.py)
is most of torch's whole F.batch_norm + relu. The node in bnfast/csrc/autograd_node.cpp is a plain C++
torch::autograd::Node, as torch's own ops have, around the same Python forward and backward (bnfast/ops.py).

How: the first process that needs it compiles the one source file with the C++ compiler (`CXX`, else `c++`) against
the installed torch's headers and libraries (the paths and flags torch.utils.cpp_extension uses; no ninja, no build
step at install) into the cache directory (`BNFAST_CACHE_DIR`, else `$XDG_CACHE_HOME/bnfast`, else ~/.cache/bnfast),
under a name that hashes the source, torch's version and build, Python's ABI and the compiler: every later process
loads it. Compiling takes about a minute on a 2-core machine (`python -m bnfast.native` builds it ahead of time
and prints where it is). Whenever it cannot be had (no compiler, no Python headers, a failed build or load, or
BNFAST_NATIVE_AUTOGRAD=0) `load()` returns None, `reason()` says why, and bnfast.ops takes its
torch.autograd.Function instead: same kernels, same results, more host time.

Imports: the standard library, torch.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "autograd_node.cpp")
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))  # its include/ and lib/ (torch.utils.cpp_extension's paths)
MODULE_NAME = "_bnfast_autograd"  # PyInit__bnfast_autograd in the source
_STATE: list = []  # [module or None, reason or None] once loading was tried


def cache_dir() -> str:
    root = os.environ.get("BNFAST_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bnfast")
    return root


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _shared_node_ptr() -> bool:
    """torch's Edge holds a std::shared_ptr<Node> (older releases) or a c10::intrusive_ptr<Node> (newer)."""
    with open(os.path.join(_TORCH, "include", "torch", "csrc", "autograd", "edge.h")) as f:
        return "std::shared_ptr<Node> function" in f.read()


def _command(compiler: str, output: str) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [compiler, "-O2", "-std=c++20", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    if _shared_node_ptr():
        command.append("-DBNFAST_SHARED_NODE_PTR")
    include = os.path.join(_TORCH, "include")
    command += [f"-I{p}" for p in (sysconfig.get_paths()["include"], include)]
    lib = os.path.join(_TORCH, "lib")
    command += [SOURCE, "-o", output, f"-L{lib}", f"-Wl,-rpath,{lib}"]
    return command + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def library_path(compiler: str) -> str:
    """Where the build of the current source for this torch, Python and compiler lives (or will)."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read())
    for part in (torch.__version__, torch.version.git_version, sys.implementation.cache_tag, sys.abiflags, compiler):
        digest.update(str(part).encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return os.path.join(cache_dir(), f"autograd_node-{digest.hexdigest()[:16]}{suffix}")


def build(compiler: str) -> str:
    """Compile the source (unless its build is cached) and return the library's path; raises on failure."""
    path = library_path(compiler)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))  # then renamed: concurrent builds are safe
    os.close(fd)
    try:
        proc = subprocess.run(_command(compiler, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{os.path.basename(compiler)} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load():
    """The extension module (its `apply`: see bnfast/csrc/autograd_node.cpp), or None (`reason()` says why)."""
    if _STATE:
        return _STATE[0]
    module, why = None, None
    if os.environ.get("BNFAST_NATIVE_AUTOGRAD", "1") == "0":
        why = "BNFAST_NATIVE_AUTOGRAD=0"
    elif (compiler := _compiler()) is None:
        why = "no C++ compiler (CXX or c++ on PATH)"
    else:
        try:
            path = build(compiler)
            spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as error:  # any failure: the Function entry instead, and the reason kept
            module, why = None, f"{type(error).__name__}: {error}"
    _STATE[:] = [module, why]
    return module


def reason() -> str | None:
    """Why the C++ node is not used (None when it is, or before the first load)."""
    return _STATE[1] if _STATE else None


if __name__ == "__main__":
    loaded = load()
    print(f"bnfast C++ autograd node: {loaded.__file__}" if loaded is not None else f"not available: {reason()}")
    sys.exit(0 if loaded is not None else 1)
