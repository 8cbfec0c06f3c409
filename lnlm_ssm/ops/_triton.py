"""What our Triton kernels share: op registration, jit helpers, interpreter fixes.

Imported only by the kernels' modules (never at ``import lnlm_ssm``).
"""

import torch
import triton
import triton.language as tl

from lnlm_ssm.ops._backends import _triton_interpreted


def _index_runtime_scalars() -> None:
    """Let Triton <= 3.6's interpreter take runtime loop bounds under NumPy >= 2.4.

    The interpreter holds a scalar as a shape-(1,) array and gives tensors an
    ``__index__`` that calls int() on it, which NumPy 2.4 rejects, so any
    ``range(lo, hi, step)`` with a runtime bound (an int argument, program_id,
    cdiv of one) fails with "only 0-dimensional arrays can be converted to
    Python scalars" (triton-lang/triton#9171, fixed after 3.6). No loop form
    avoids it in the kernels short of a while loop (which the GPU compiler does
    not pipeline) or constexpr bounds (a compile per sequence length). Compiled
    kernels never call ``__index__``: this touches only interpreted runs.
    """
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_then_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_tensor_then_index


if tuple(int(part) for part in triton.__version__.split(".")[:2]) <= (3, 6):
    _index_runtime_scalars()


# triton_op lets torch.compile see the launches themselves, and traces the
# launcher on fake tensors as its own fake implementation. Interpreted kernels
# would run on those fake tensors, so under the interpreter the launcher is an
# opaque custom_op and ``fake`` gives its outputs' shapes instead.
TRITON_OP = hasattr(torch.library, "triton_op") and not _triton_interpreted()
wrap = torch.library.wrap_triton if TRITON_OP else (lambda kernel: kernel)


def refuse_float64(op: str, arg: str, tensor: torch.Tensor, float64_backends: str = "'reference' or 'cpu'") -> None:
    """Our Triton kernels compute in fp32: a float64 ``tensor`` (the argument ``arg`` of ``op``) is a TypeError."""
    if tensor.dtype == torch.float64:
        raise TypeError(
            f"{op}: backend 'triton' computes in float32 and {arg} has dtype float64; "
            f"use backend={float64_backends} for float64"
        )


def library_op(name, fn, mutates_args, fake, *, namespace="lnlm_ssm_triton"):
    """``fn`` as the torch op ``namespace::name``, with ``fake`` for tracing where it is opaque.

    Every Triton op is registered through here, and ``fn`` launches its kernels
    through :data:`wrap`, so that the choice above is made once for all of them.
    """
    qualname = f"{namespace}::{name}"
    if TRITON_OP:
        return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)
    op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


# The kernels use only Triton builtins and the jit helpers below, none of
# triton.language.standard (tl.sum, tl.sigmoid, tl.zeros): those are decorated
# when triton is imported, so under TRITON_INTERPRET=1 set after that import they
# would not be interpreted. Ours are decorated when this module is imported.


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, _add)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def store_rounded(ptrs, value, mask):
    """Store fp32 ``value`` in the pointee's dtype, rounding to nearest even.

    The GPU rounds so when narrowing to bfloat16, but Triton's interpreter
    truncates: rounding the bits here first makes both give torch's result.
    """
    if ptrs.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        value = tl.where(value == value, rounded, value)  # NaN stays NaN
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)
