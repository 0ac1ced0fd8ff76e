"""Compatibility with the Triton releases bnfast supports (3.6 to 3.8): shims applied once, at import.

Triton 3.6's interpreter (TRITON_INTERPRET=1, how the kernels run on CPU) converts a scalar tensor to an index
with `int(handle.data)`, and its scalars are 1-element arrays: numpy 2.4 and later refuse that conversion
("only 0-dimensional arrays can be converted to Python scalars"), so every kernel that loops over
`range(tl.program_id(...), ...)` (the split plan, the eval kernels) crashed inside the interpreter. Triton 3.8
converts `handle.data.squeeze()` instead; `patch_interpreter_index` gives 3.6 and 3.7 the same conversion. It
changes nothing for 0-dimensional and 1-element data that numpy already accepted, and nothing in compiled code.

Imports: triton only (numpy through Triton's interpreter).
"""

import os

import triton


def _version(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def patch_interpreter_index() -> bool:
    """On Triton < 3.8 with the interpreter requested, make a scalar tensor's `__index__` accept the interpreter's
    1-element arrays (see the module docstring). Returns True when the patch was applied."""
    if _version(triton.__version__) >= (3, 8) or not interpreter_requested():
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_bnfast_index_shim", False):
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # scope restores in reverse order: this entry first (back to 3.6's lambda), then 3.6's own entry
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._bnfast_index_shim = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


INTERPRETER_INDEX_PATCHED = patch_interpreter_index()
