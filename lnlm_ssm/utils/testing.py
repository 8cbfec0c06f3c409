"""The one tolerance policy for comparing kernels with their references.

Two rules, both per dtype:

- ``assert_close(actual, expected, dtype)``: absolute/relative tolerances by the
  dtype the computation ran in (the inputs' dtype, not the dtype compared).
- ``assert_close_to_ref(actual, reference, reference_lowp)``: the flash-attention
  rule. ``reference`` is computed in high precision (fp64/fp32), ``reference_lowp``
  is the reference run on the same low-precision inputs. A kernel may err from
  ``reference`` by at most ``ERROR_FACTOR`` times the error of ``reference_lowp``,
  plus a small floor for exact agreement cases.
"""

from __future__ import annotations

import torch

# (atol, rtol) by compute dtype. fp32 bounds cover reassociation in long reductions.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (5e-3, 5e-3),
}
ERROR_FACTOR = 2.0


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for results computed from inputs of ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Compare with the tolerance of ``dtype`` (default: ``expected``'s dtype)."""
    atol, rtol = tolerance(dtype or expected.dtype)
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=(lambda m: f"{msg}\n{m}") if msg else None
    )


def assert_close_to_ref(actual, reference, reference_lowp, msg: str = "") -> None:
    """Kernel error against the high-precision reference <= ERROR_FACTOR x the low-precision reference's error."""
    reference = reference.double()
    kernel_err = (actual.double() - reference).abs().max().item()
    ref_err = (reference_lowp.double() - reference).abs().max().item()
    floor = tolerance(torch.float32)[0] * max(1.0, reference.abs().max().item())
    bound = ERROR_FACTOR * ref_err + floor
    if not kernel_err <= bound:  # an explicit raise survives python -O
        raise AssertionError(
            f"{msg} max error {kernel_err:.3e} exceeds {ERROR_FACTOR} x the low-precision reference's "
            f"error {ref_err:.3e} (+ floor {floor:.1e})"
        )
