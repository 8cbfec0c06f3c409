#!/usr/bin/env python
"""How fast are the scans? Every lnlm_ssm backend beside the reference and the peers, in one run.

Usage::

    python benchmarks/scan_speed.py                    # Mamba-1 selective scan, CPU, defaults below
    python benchmarks/scan_speed.py --op ssd           # Mamba-2 chunked SSD scan
    python benchmarks/scan_speed.py --quick            # tiny sizes, few repeats (CI)
    python benchmarks/scan_speed.py --device cuda      # GPU sizes, bf16; adds mamba_ssm if importable

Rows
----
- every backend in ``lnlm_ssm.ops.available_backends()`` that has a kernel for
  the op on the device (a backend without one is skipped with the reason).
  The reference of ``selective_scan`` is the sequential PyTorch loop over time
  the Mamba paper compares its kernel against ("a standard scan in PyTorch");
  the reference of ``ssd`` is the chunked PyTorch formulation;
- peers: ``mambapy`` (``pscan``, a Blelloch scan over (batch, seqlen, dim,
  dstate) tensors; selective_scan only) and, on CUDA, ``mamba_ssm``. A peer
  that is missing is skipped with a note. For ssd also ``sdpa``: causal
  softmax attention through ``torch.nn.functional.scaled_dot_product_attention``
  over the same heads (q = k = v = x, (batch, nheads, seqlen, headdim)), what a
  Transformer layer of the same width pays for its sequence mixing (flash
  kernels on GPU). It computes something else, so it is not checked against
  the reference and gets no roofline columns; its fwd+bwd differentiates x only. Triton on the CPU runs under its
  interpreter, so it is only timed when ``--backends`` names it.

Each call is the one the Mamba / Mamba-2 layer makes: selective_scan with D,
z, delta_bias and ``delta_softplus=True``; ssd with D, dt_bias and
``dt_softplus=True`` (Mamba-2 gates in its norm, so z is not passed). A, D and
the biases are fp32 as the layers keep them; the other inputs use ``--dtype``.

What is measured
----------------
- a check first: each row's forward output at the smallest seqlen against the
  reference's, max abs error printed; a row beyond a loose sanity bound
  (``tol * (1 + max|ref|)``, tol 1e-3 for fp32/fp64, 5e-2 for bf16/fp16) is
  marked ``MISMATCH``;
- "fwd": one forward under ``torch.no_grad()`` (inference);
- "fwd+bwd": forward with every float input requiring grad, then
  ``torch.autograd.grad`` of the output against a fixed random cotangent for
  all float inputs;
- times are medians over ``--repeats`` after ``--warmup`` calls (CUDA events on
  GPU, ``perf_counter`` on CPU; see ``lnlm_ssm/utils/benchmark.py``);
- peak extra memory of one fwd+bwd (``lnlm_ssm.utils.benchmark.peak_extra_memory``):
  "mem" = tensors from torch's allocator (profiler allocation events on CPU,
  ``max_memory_allocated`` on CUDA), "rss" = growth of the process's resident
  set on Linux CPU (everything, allocator slack included). Both include the
  output and the gradients the call returns; neither includes the inputs.
  "extra" subtracts what the call has to return (y and one gradient per
  input, at their sizes) from rss (from mem where rss is unknown): the scratch
  and saved state an implementation needs on top. The header prints the size
  of the input u (selective_scan) or x (ssd) to compare it with;
- ``--budget-s`` bounds the time spent on one measurement (warm-up + repeats,
  and the memory probe, of one impl at one seqlen and mode). The time per call
  at the next seqlen is extrapolated from the shorter ones (power law through
  the last two, exponent clamped to [1, 2]; fwd+bwd is taken to be at least
  fwd). A measurement that would not fit even with 1 warm-up and 3 repeats is
  skipped with a note; one that fits gets as many repeats as the budget
  allows, up to ``--repeats``. With nothing to extrapolate from (the first
  seqlen), one call is made to find out; if it alone is over budget, its time
  is reported as "a single cold call" (no memory probe) and longer seqlens are
  extrapolated from it. ``--budget-s 0`` turns the budget off.

Roofline counts (per forward call; ``lnlm_ssm.utils.benchmark.Roofline``)
------------------------------------------------------------------------
Bytes are the minimum traffic: every input read once + the output written
once, each at its own element size. For selective_scan (b batch, d dim, l
seqlen, n dstate; A, D, delta_bias fp32)::

    bytes = s * (3 b d l  [u, delta, z]  +  2 b n l  [B, C]  +  b d l  [y])  +  4 * (d n + 2 d)
    flops = b d l (8 n + 6)

where s is the element size of ``--dtype``. The 8 flops per (b, d, t, n)
element: Δ·A and its exp (2), Δ·u·B (2), h = dA·h + dBu (2), C·h and its sum
over n (2); the 6 per (b, d, t): + delta_bias, softplus, D·u and its add,
silu(z), the gating multiply (exp/softplus/silu counted as 1 flop each).

For ssd (b batch, l seqlen, h nheads, p headdim, g ngroups, n dstate,
Q chunk_size, c = ceil(l / Q) chunks; A, D, dt_bias fp32)::

    bytes = s * (2 b l h p  [x, y]  +  b l h  [dt]  +  2 b l g n  [B, C])  +  4 * 3 h
    flops = 2 b c Q^2 g n      C_t . B_s scores per chunk and group
          + 2 b c Q^2 h p      masked scores @ x within each chunk
          + 2 b c Q h n p      each chunk's own final state  (B^T @ x)
          + 2 b c h n p        passing states across chunk boundaries
          + 2 b c Q h n p      entering states read out through C

i.e. the matmul flops of the chunked formulation with the full Q x Q blocks
(the causal mask is not subtracted); elementwise decays are not counted.

The header prints the machine's measured copy bandwidth and matmul peak
(``--dtype``); each row prints achieved fwd GB/s and GFLOP/s and the fraction
of each ceiling. Results go to ``results.json`` and ``time_vs_seqlen.png`` in
``--out`` (default ``benchmarks/out/<op>-<device>-<timestamp>/``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

try:
    import lnlm_ssm  # noqa: F401
except ModuleNotFoundError as _exc:  # a checkout that was never `pip install`ed
    if _exc.name != "lnlm_ssm":
        raise
    sys.path.insert(0, str(REPO_ROOT))
    print(
        f"note: lnlm_ssm is not installed; importing it from the checkout at {REPO_ROOT} "
        "(only its reference backend may be usable: `pip install -e .` builds the kernels)",
        file=sys.stderr,
    )
    import lnlm_ssm  # noqa: F401

from lnlm_ssm import ops  # noqa: E402
from lnlm_ssm.utils.benchmark import (  # noqa: E402
    Roofline,
    format_bytes_mib,
    measure_copy_bandwidth,
    measure_matmul_peak,
    median,
    peak_extra_memory,
    synchronize,
    tensor_bytes,
    time_fn,
    torch_threads,
)

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Problem sizes: (op, device) -> defaults; "quick" replaces them for CI.
DEFAULTS = {
    ("selective_scan", "cpu"): dict(batch=2, dim=1536, dstate=16, seqlens=[256, 512, 1024, 2048]),
    ("selective_scan", "cuda"): dict(batch=8, dim=2048, dstate=16, seqlens=[1024, 2048, 4096, 8192]),
    ("ssd", "cpu"): dict(
        batch=2, nheads=24, headdim=64, dstate=64, ngroups=1, chunk_size=256, seqlens=[256, 512, 1024, 2048]
    ),
    ("ssd", "cuda"): dict(
        batch=4, nheads=32, headdim=64, dstate=128, ngroups=1, chunk_size=256, seqlens=[1024, 2048, 4096, 8192]
    ),
}
QUICK = {
    "selective_scan": dict(batch=1, dim=64, dstate=8, seqlens=[64, 128]),
    "ssd": dict(batch=1, nheads=4, headdim=16, dstate=16, ngroups=1, chunk_size=32, seqlens=[64, 128]),
}
MIN_REPEATS = 3
OUR_BACKENDS = ("reference", "cpu", "triton", "cuda")
PEERS = ("mambapy", "mamba_ssm", "sdpa")
SANITY_TOL = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}

REFERENCE_LABEL = {"selective_scan": "reference (PyTorch loop)", "ssd": "reference (PyTorch chunked)"}


# ---------------------------------------------------------------------------
# Implementations (rows)
# ---------------------------------------------------------------------------


@dataclass
class Impl:
    label: str  # printed name
    key: str  # what --backends selects: a backend name, "mambapy" or "mamba_ssm"
    kind: str  # "lnlm_ssm", "peer", or "baseline" (another computation: not checked against the reference)
    fn: Callable[[dict], torch.Tensor]  # inputs -> y


def _ours_selective_scan(backend: str) -> Callable[[dict], torch.Tensor]:
    def run(t):
        return ops.selective_scan_fn(
            t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
            delta_softplus=True, backend=backend,
        )

    return run


def _ours_ssd(backend: str, chunk_size: int) -> Callable[[dict], torch.Tensor]:
    def run(t):
        return ops.mamba_chunk_scan_combined(
            t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size,
            D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, backend=backend,
        )

    return run


def _sdpa_attention(t) -> torch.Tensor:
    """Causal softmax attention over x's heads (q = k = v = x): what a Transformer layer of the same width pays."""
    x = t["x"].transpose(1, 2)  # (b, h, l, p)
    return F.scaled_dot_product_attention(x, x, x, is_causal=True).transpose(1, 2)


def _mambapy_selective_scan(pscan) -> Callable[[dict], torch.Tensor]:
    """The selective scan the way mambapy's Mamba block computes it, on our layout.

    mambapy keeps every parameter in the model dtype, so A, D and delta_bias
    are cast to u's dtype here.
    """

    def run(t):
        u, delta, z = t["u"], t["delta"], t["z"]
        dtype = u.dtype
        A, D, bias = t["A"].to(dtype), t["D"].to(dtype), t["delta_bias"].to(dtype)
        delta = F.softplus(delta + bias[:, None]).transpose(1, 2)  # (b, l, d)
        u_l = u.transpose(1, 2)  # (b, l, d)
        delta_a = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
        delta_b_u = (delta * u_l).unsqueeze(-1) * t["B"].transpose(1, 2).unsqueeze(2)  # (b, l, d, n)
        hs = pscan(delta_a, delta_b_u)  # (b, l, d, n)
        y = (hs @ t["C"].transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # (b, l, d)
        y = (y + D * u_l) * F.silu(z.transpose(1, 2))
        return y.transpose(1, 2)

    return run


def _mamba_ssm_selective_scan(fn) -> Callable[[dict], torch.Tensor]:
    def run(t):
        return fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], delta_softplus=True)

    return run


def _mamba_ssm_ssd(fn, chunk_size: int) -> Callable[[dict], torch.Tensor]:
    def run(t):
        return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)

    return run


def build_impls(args, notes: list[str]) -> list[Impl]:
    """Rows for this run, reference first; reasons for missing ones go to ``notes``."""
    wanted = set(args.backends) if args.backends else None
    impls: list[Impl] = []

    available = ops.available_backends()
    for name in OUR_BACKENDS:
        if wanted is not None and name not in wanted:
            continue
        if name not in available:
            if wanted is not None or name in _backends_for(args.device):
                notes.append(f"{name}: not available: {ops.backend_report().get(name, '?')}")
            continue
        if name == "triton" and args.device == "cpu":
            if wanted is None:
                notes.append("triton: on the CPU it runs under the interpreter; name it in --backends to time it")
                continue
        elif name not in _backends_for(args.device):
            if wanted is not None:
                notes.append(f"{name}: does not run on {args.device} tensors")
            continue
        label = REFERENCE_LABEL[args.op] if name == "reference" else name
        fn = _ours_selective_scan(name) if args.op == "selective_scan" else _ours_ssd(name, args.chunk_size)
        impls.append(Impl(label, name, "lnlm_ssm", fn))

    if wanted is None or "mambapy" in wanted:
        if args.op == "selective_scan":
            try:
                from mambapy.pscan import pscan
            except ImportError as exc:
                notes.append(f"mambapy not installed ({exc}): pip install mambapy")
            else:
                impls.append(Impl("mambapy pscan", "mambapy", "peer", _mambapy_selective_scan(pscan)))
        else:
            notes.append("mambapy: has no SSD scan of its own (its Mamba2 calls mamba_ssm's Triton kernel)")

    if args.op == "ssd" and (wanted is None or "sdpa" in wanted):
        impls.append(Impl("causal attention (torch SDPA)", "sdpa", "baseline", _sdpa_attention))

    if wanted is None or "mamba_ssm" in wanted:
        if args.device != "cuda":
            notes.append("mamba_ssm: CUDA only, no CPU path: no row on cpu")
        else:
            try:
                if args.op == "selective_scan":
                    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as peer

                    fn = _mamba_ssm_selective_scan(peer)
                else:
                    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as peer

                    fn = _mamba_ssm_ssd(peer, args.chunk_size)
            except ImportError as exc:
                notes.append(f"mamba_ssm not installed ({exc}): pip install mamba-ssm")
            else:
                impls.append(Impl("mamba_ssm", "mamba_ssm", "peer", fn))
    return impls


def _backends_for(device: str) -> tuple[str, ...]:
    return ("reference", "cpu") if device == "cpu" else ("reference", "triton", "cuda")


# ---------------------------------------------------------------------------
# Problems: inputs and roofline counts
# ---------------------------------------------------------------------------


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def make_inputs(args, seqlen: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs as the layers see them after their projections (seeded, so every row sees the same)."""
    gen = torch.Generator(device="cpu").manual_seed(1234 + seqlen)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    # Step sizes as Mamba initialises them: softplus(bias) log-uniform in [1e-3, 1e-1].
    def dt_bias(n):
        dt = torch.exp(torch.rand(n, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return _inv_softplus(dt).to(device=device, dtype=torch.float32)

    if args.op == "selective_scan":
        b, d, n = args.batch, args.dim, args.dstate
        A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # S4D-real, as Mamba's A_log init
        return {
            "u": randn(b, d, seqlen),
            "delta": randn(b, d, seqlen, scale=0.5),
            "A": A.to(device),
            "B": randn(b, n, seqlen),
            "C": randn(b, n, seqlen),
            "D": torch.ones(d, device=device),
            "z": randn(b, d, seqlen),
            "delta_bias": dt_bias(d),
        }
    b, h, p, g, n = args.batch, args.nheads, args.headdim, args.ngroups, args.dstate
    A = -torch.exp(torch.rand(h, generator=gen) * math.log(16.0))  # Mamba-2's A_init_range (1, 16)
    return {
        "x": randn(b, seqlen, h, p),
        "dt": randn(b, seqlen, h, scale=0.5),
        "A": A.to(device),
        "B": randn(b, seqlen, g, n),
        "C": randn(b, seqlen, g, n),
        "D": torch.ones(h, device=device),
        "dt_bias": dt_bias(h),
    }


def roofline(args, seqlen: int, inputs: dict) -> Roofline:
    """Minimum bytes and the documented flop count of one forward call (module docstring)."""
    if args.op == "selective_scan":
        u = inputs["u"]
        nbytes = tensor_bytes(*inputs.values()) + tensor_bytes(u)  # + y, shaped and typed like u
        b, d, n = args.batch, args.dim, args.dstate
        return Roofline(nbytes, b * d * seqlen * (8 * n + 6))
    x = inputs["x"]
    nbytes = tensor_bytes(*inputs.values()) + tensor_bytes(x)  # + y, shaped and typed like x
    b, h, p, g, n, Q = args.batch, args.nheads, args.headdim, args.ngroups, args.dstate, args.chunk_size
    c = -(-seqlen // Q)
    flops = 2 * b * c * (Q * Q * g * n + Q * Q * h * p + 2 * Q * h * n * p + h * n * p)
    return Roofline(nbytes, flops)


def shape_description(args) -> str:
    if args.op == "selective_scan":
        return (
            f"batch {args.batch}, dim {args.dim}, dstate {args.dstate}, {args.dtype} "
            "(A, D, delta_bias fp32); D, z, delta_bias given, delta_softplus=True"
        )
    return (
        f"batch {args.batch}, nheads {args.nheads}, headdim {args.headdim}, dstate {args.dstate}, "
        f"ngroups {args.ngroups}, chunk {args.chunk_size}, {args.dtype} (A, D, dt_bias fp32); "
        "D, dt_bias given, dt_softplus=True"
    )


def _input_mib(args, seqlen: int, dtype: torch.dtype) -> float:
    """Size of u (selective_scan: batch x dim x seqlen) or x (ssd: batch x seqlen x nheads x headdim)."""
    per_step = args.dim if args.op == "selective_scan" else args.nheads * args.headdim
    return args.batch * per_step * seqlen * torch.empty((), dtype=dtype).element_size() / 2**20


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    seqlen: int
    impl: str
    key: str
    kind: str
    fwd_ms: Optional[float] = None
    fwd_ms_all: list = field(default_factory=list)
    fwdbwd_ms: Optional[float] = None
    fwdbwd_ms_all: list = field(default_factory=list)
    speedup_fwd: Optional[float] = None
    speedup_fwdbwd: Optional[float] = None
    bytes: int = 0
    flops: int = 0
    roofline_ms: Optional[float] = None
    fwd_gbps: Optional[float] = None
    fwd_gflops: Optional[float] = None
    frac_bandwidth: Optional[float] = None
    frac_matmul_peak: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    peak_rss_bytes: Optional[int] = None
    returned_bytes: Optional[int] = None
    extra_bytes: Optional[int] = None
    check_ok: Optional[bool] = None
    notes: list = field(default_factory=list)


def _predict(history: list, seqlen: int) -> Optional[float]:
    """Seconds per call at ``seqlen`` from (seqlen, seconds) points measured before."""
    if not history:
        return None
    l1, t1 = history[-1]
    exponent = 1.0
    if len(history) >= 2:
        l0, t0 = history[-2]
        if l1 != l0 and t0 > 0 and t1 > 0:
            exponent = min(2.0, max(1.0, math.log(t1 / t0) / math.log(l1 / l0)))
    return t1 * (seqlen / l1) ** exponent


def _plan(args, predicted: float, warmed: int, extra_calls: int):
    """(warmup, repeats) that fit --budget-s, or None when even the minimum does not.

    ``warmed`` calls were already made (they count as warm-up); ``extra_calls``
    follow the timed repeats (the memory probe).
    """
    warmup_left = max(0, args.warmup - warmed)
    if args.budget_s is None:
        return warmup_left, args.repeats
    min_warmup = 0 if warmed else min(1, warmup_left)
    if predicted * (min_warmup + MIN_REPEATS + extra_calls) > args.budget_s:
        return None
    calls = int(args.budget_s // max(predicted, 1e-9)) - extra_calls
    warmup = min(warmup_left, max(min_warmup, calls - MIN_REPEATS))
    repeats = min(args.repeats, max(MIN_REPEATS, calls - warmup))
    return warmup, repeats


def _requires_grad(inputs: dict) -> tuple[dict, list]:
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    return leaves, [v for v in leaves.values() if v.requires_grad]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _error_note(exc: BaseException) -> str:
    if _is_oom(exc):
        return "out of memory"
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_against_reference(args, impls, device, dtype, notes) -> tuple[list, list[dict]]:
    """Forward of each impl vs the reference at the smallest seqlen; drops impls that cannot run.

    Returns ``[(impl, ok)]`` (``ok`` is None when the reference itself could not
    run) and one dict per comparison made.
    """
    seqlen = min(args.seqlens)
    inputs = make_inputs(args, seqlen, device, dtype)
    if args.op == "selective_scan":
        ref_fn = _ours_selective_scan("reference")
    else:
        ref_fn = _ours_ssd("reference", args.chunk_size)
    try:
        with torch.no_grad():
            ref = ref_fn(inputs).float()
    except Exception as exc:
        notes.append(f"reference failed at the check (seqlen {seqlen}): {_error_note(exc)}; rows are unchecked")
        ref = None
    if ref is not None:
        ref_max = ref.abs().max().item() if ref.numel() else 0.0
        bound = SANITY_TOL[dtype] * (1.0 + ref_max)
    kept, checks = [], []
    for impl in impls:
        failed = False
        try:
            with torch.no_grad():
                out = impl.fn(inputs)
        except ops.BackendUnavailableError as exc:
            notes.append(f"{impl.label}: skipped: {exc}")
            continue
        except Exception as exc:  # a broken row should not hide the others
            notes.append(f"{impl.label}: skipped at the check (seqlen {seqlen}): {_error_note(exc)}")
            failed = True
        if failed:
            gc.collect()
            _release(device)
            continue
        if ref is None or impl.kind == "baseline":
            kept.append((impl, None))
            continue
        err = (out.float() - ref).abs().max().item() if ref.numel() else 0.0
        ok = bool(err <= bound)  # NaN compares False
        checks.append(
            {"impl": impl.label, "seqlen": seqlen, "max_abs_err": err, "ref_max_abs": ref_max, "bound": bound, "ok": ok}
        )
        kept.append((impl, ok))
    return kept, checks


def _measure_one(args, call, device, history: list, seqlen: int, extra_calls: int, floor_s: Optional[float] = None):
    """(times in seconds, note) of ``call`` at ``seqlen``; times is None when skipped for the budget.

    The time per call is extrapolated from ``history`` (this impl and mode at
    shorter seqlens); with no history, one call is made first to find out (it
    doubles as a warm-up and joins ``history``); if the budget then allows no
    repeats, that single call is returned, with a note saying so. ``floor_s``
    is a known lower bound on one call (fwd+bwd takes at least as long as
    fwd), used when it predicts more.
    """
    predicted, warmed, source = _predict(history, seqlen), 0, "predicted"
    if floor_s is not None and floor_s > (predicted or 0.0):
        if predicted is not None or _plan(args, floor_s, 0, extra_calls) is None:
            predicted, source = floor_s, "fwd alone takes"
    if predicted is None:
        t0 = time.perf_counter()
        call()
        synchronize(device)
        predicted, warmed, source = time.perf_counter() - t0, 1, "first call took"
        history.append((seqlen, predicted))
    plan = _plan(args, predicted, warmed, extra_calls)
    if plan is None:
        calls = MIN_REPEATS + extra_calls + (0 if warmed else min(1, args.warmup))
        if warmed:  # the one call made is all there will be: report it, flagged
            return [predicted], (
                f"a single cold call ({predicted:.2f} s): {calls} more calls would exceed --budget-s {args.budget_s:g}"
            )
        return None, f"skipped: {source} {predicted:.2f} s/call, x {calls} calls > --budget-s {args.budget_s:g}"
    warmup, repeats = plan
    times = time_fn(call, warmup=warmup, repeats=repeats, device=device, budget_s=args.budget_s)
    if warmed:
        history.pop()  # the probe's time gives way to the measured median
    history.append((seqlen, median(times)))
    return times, None


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(args, impls_ok, device, dtype, notes) -> list[Row]:
    rows: list[Row] = []
    history: dict = {}
    for seqlen in args.seqlens:
        inputs = make_inputs(args, seqlen, device, dtype)
        leaves, grad_inputs = _requires_grad(inputs)
        roof = roofline(args, seqlen, inputs)
        dy = None
        for impl, check_ok in impls_ok:
            row = Row(args.op, seqlen, impl.label, impl.key, impl.kind)
            if impl.kind != "baseline":  # the counts are the scan's; a baseline's would differ
                row.bytes, row.flops = roof.bytes, roof.flops
            row.check_ok = check_ok
            rows.append(row)
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":

                        def call(fn=impl.fn):
                            with torch.no_grad():
                                return fn(inputs)

                    else:
                        if dy is None:  # y has u's (selective_scan) or x's (ssd) shape and dtype
                            y_like = inputs["u"] if args.op == "selective_scan" else inputs["x"]
                            gen = torch.Generator(device="cpu").manual_seed(99)
                            dy = torch.randn(*y_like.shape, generator=gen).to(device=device, dtype=dtype)

                        # A baseline computes something else: only the input it reads gets a gradient.
                        wrt = [leaves["x"]] if impl.kind == "baseline" else grad_inputs

                        def call(fn=impl.fn, wrt=wrt):
                            return torch.autograd.grad(fn(leaves), wrt, dy)

                    extra = 2 if (mode == "fwd+bwd" and not args.no_memory) else 0
                    hist = history.setdefault((impl.key, mode), [])
                    floor_s = None  # fwd+bwd takes at least as long as fwd, measured or predicted
                    if mode == "fwd+bwd":
                        floor_s = row.fwd_ms / 1e3 if row.fwd_ms else _predict(history[(impl.key, "fwd")], seqlen)
                    times, note = _measure_one(args, call, device, hist, seqlen, extra, floor_s)
                    if note:
                        row.notes.append(f"{mode} {note}")
                    if times is None:
                        _progress(f"seqlen {seqlen} {impl.label} {mode}: {note}")
                        continue
                    _progress(
                        f"seqlen {seqlen} {impl.label} {mode}: {median(times) * 1e3:.3f} ms "
                        f"(median of {len(times)})" + (f"; {note}" if note else "")
                    )
                    ms = [x * 1e3 for x in times]
                    if mode == "fwd":
                        row.fwd_ms, row.fwd_ms_all = median(ms), ms
                    else:
                        row.fwdbwd_ms, row.fwdbwd_ms_all = median(ms), ms
                        if not args.no_memory and not note:
                            mem = peak_extra_memory(call, device)
                            row.peak_mem_bytes, row.peak_rss_bytes = mem["torch_bytes"], mem["rss_bytes"]
                            row.returned_bytes = _nbytes(dy) + sum(_nbytes(t) for t in wrt)
                            seen = row.peak_rss_bytes if row.peak_rss_bytes is not None else row.peak_mem_bytes
                            if seen is not None:
                                row.extra_bytes = seen - row.returned_bytes
                except ops.BackendUnavailableError as exc:
                    row.notes.append(f"{mode} skipped: {exc}")
                except Exception as exc:  # one failing row should not hide the others
                    row.notes.append(f"{mode} {_error_note(exc)}")
                    failed = True
                else:
                    failed = False
                if failed:  # the traceback (and the tensors it held) is gone by now
                    gc.collect()
                    _release(device)
        del inputs, leaves, grad_inputs, dy
        gc.collect()
        _release(device)
    return rows


def fill_derived(rows: list[Row], ceilings: dict) -> None:
    ref = {r.seqlen: r for r in rows if r.key == "reference"}
    for r in rows:
        base = ref.get(r.seqlen)
        if base is not None:
            if base.fwd_ms and r.fwd_ms:
                r.speedup_fwd = base.fwd_ms / r.fwd_ms
            if base.fwdbwd_ms and r.fwdbwd_ms:
                r.speedup_fwdbwd = base.fwdbwd_ms / r.fwdbwd_ms
        if r.kind == "baseline":
            continue
        roof = Roofline(r.bytes, r.flops)
        r.roofline_ms = roof.bound_s(ceilings["copy_gbps"], ceilings["matmul_gflops"]) * 1e3
        if r.fwd_ms:
            got = roof.achieved(r.fwd_ms / 1e3, ceilings["copy_gbps"], ceilings["matmul_gflops"])
            r.fwd_gbps, r.fwd_gflops = got["gbps"], got["gflops"]
            r.frac_bandwidth, r.frac_matmul_peak = got["frac_bandwidth"], got["frac_matmul_peak"]


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def machine_info(device: torch.device, threads: Optional[int]) -> dict:
    def version(dist):
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if threads is None else threads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "mambapy": version("mambapy"),
        "mamba_ssm": version("mamba-ssm") or version("mamba_ssm"),
        "lnlm_ssm": getattr(lnlm_ssm, "__version__", None),
        "git_commit": commit,
        "backends": list(ops.available_backends()),
        # Other processes compete for the cores: read the times with this in mind.
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _pct(frac: Optional[float]) -> str:
    if frac is None:
        return "-"
    return f"{frac * 100:.1f}%" if frac >= 0.001 else f"{frac * 100:.2f}%"


def format_table(rows: list[Row]) -> str:
    head = (
        "op", "seqlen", "impl", "fwd ms", "f+b ms", "x ref fwd", "x ref f+b",
        "GB/s", "%bw", "GFLOP/s", "%peak", "mem MiB", "rss MiB", "extra MiB", "note",
    )
    body = []
    for r in rows:
        flag = "" if r.check_ok in (True, None) else "MISMATCH"
        note = "; ".join(([flag] if flag else []) + r.notes)
        body.append((
            r.op, str(r.seqlen), r.impl,
            _fmt(r.fwd_ms, ".3f"), _fmt(r.fwdbwd_ms, ".3f"),
            _fmt(r.speedup_fwd, ".2f"), _fmt(r.speedup_fwdbwd, ".2f"),
            _fmt(r.fwd_gbps, ".2f"), _pct(r.frac_bandwidth),
            _fmt(r.fwd_gflops, ".2f"), _pct(r.frac_matmul_peak),
            format_bytes_mib(r.peak_mem_bytes), format_bytes_mib(r.peak_rss_bytes), format_bytes_mib(r.extra_bytes),
            note,
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    left = {0, 2, len(head) - 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def write_plot(path: Path, rows: list[Row], title: str) -> Optional[str]:
    """Log-log time vs seqlen per impl, fwd and fwd+bwd panels; returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullLocator
    except ImportError as exc:
        return f"plot skipped: matplotlib not installed ({exc}): pip install matplotlib"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    impls = list(dict.fromkeys(r.impl for r in rows))
    for ax, attr, name in ((axes[0], "fwd_ms", "forward"), (axes[1], "fwdbwd_ms", "forward + backward")):
        for i, impl in enumerate(impls):  # one colour per impl in both panels
            pts = [(r.seqlen, getattr(r, attr)) for r in rows if r.impl == impl and getattr(r, attr)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        seqlens = sorted({r.seqlen for r in rows})
        ax.set_xticks(seqlens, [str(s) for s in seqlens])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("seqlen")
        ax.set_ylabel("time (ms, median)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=("selective_scan", "ssd"), default="selective_scan")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats, small ceiling probes (CI)")
    p.add_argument("--seqlens", type=_int_list, help="comma-separated, e.g. 256,512,1024")
    p.add_argument("--batch", type=int)
    p.add_argument("--dim", type=int, help="selective_scan channels")
    p.add_argument("--dstate", type=int)
    p.add_argument("--nheads", type=int, help="ssd")
    p.add_argument("--headdim", type=int, help="ssd")
    p.add_argument("--ngroups", type=int, help="ssd")
    p.add_argument("--chunk-size", type=int, help="ssd")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2 on cpu)")
    p.add_argument("--backends", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help="restrict rows, e.g. reference,cpu,mambapy,mamba_ssm")
    p.add_argument("--warmup", type=int, help="default 3 (quick: 1)")
    p.add_argument("--repeats", type=int, help="default 10 (quick: 3)")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="seconds allowed for one measurement (one impl, seqlen and fwd or fwd+bwd); "
                   "default 60, 0 = no limit")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe of fwd+bwd")
    p.add_argument("--out", type=Path, help="default benchmarks/out/<op>-<device>-<timestamp>/")
    args = p.parse_args(argv)

    sizes = dict(QUICK[args.op]) if args.quick else dict(DEFAULTS[(args.op, args.device)])
    for name, value in sizes.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.seqlens = sorted(set(args.seqlens))
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.threads is None and args.device == "cpu":
        args.threads = 2
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 3 if args.quick else 10
    unknown = sorted(set(args.backends or ()) - set(OUR_BACKENDS + PEERS))
    if unknown:
        p.error(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(OUR_BACKENDS + PEERS)}")
    if args.budget_s is not None and args.budget_s <= 0:
        args.budget_s = None
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.op == "ssd" and args.nheads % args.ngroups:
        p.error(f"--nheads ({args.nheads}) must be divisible by --ngroups ({args.ngroups})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = HERE / "out" / f"{args.op}-{args.device}-{stamp}"
    return args


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    notes: list[str] = []
    started = time.perf_counter()
    with torch_threads(args.threads if device.type == "cpu" else None):
        info = machine_info(device, args.threads if device.type == "cpu" else None)
        if args.quick:
            copy_bytes, mm_n = (32 << 20), (512 if device.type == "cpu" else 4096)
        else:
            copy_bytes, mm_n = None, None
        ceilings = {
            "copy_gbps": measure_copy_bandwidth(device, nbytes=copy_bytes),
            "matmul_gflops": measure_matmul_peak(device, dtype, n=mm_n),
            "matmul_n": mm_n or (8192 if device.type == "cuda" else 2048),
            "matmul_dtype": args.dtype,
        }
        print(
            f"# machine: {info['device']}, "
            + (f"{info['torch_threads']} torch threads, " if device.type == "cpu" else "")
            + f"torch {info['torch']}, triton {info['triton']}, lnlm_ssm backends {info['backends']}"
            + (f", load average {info['loadavg_at_start'][0]:.2f}" if info["loadavg_at_start"] else "")
        )
        print(
            f"# ceilings: copy bandwidth {ceilings['copy_gbps']:.1f} GB/s (read+write), "
            f"matmul peak {ceilings['matmul_gflops']:.1f} GFLOP/s ({args.dtype}, n={ceilings['matmul_n']})"
            + ("  [--quick: small probes, low]" if args.quick else "")
        )
        load = info["loadavg_at_start"]
        cores = os.cpu_count() or 1
        if device.type == "cpu" and load and load[0] > max(0.5, cores - args.threads + 0.5):
            warning = (
                f"load average {load[0]:.1f} on {cores} cores before the run: other processes compete for "
                "the cores; read the times as unreliable"
                + (
                    f" (with {args.threads} torch threads, OpenMP waits for a descheduled thread can make "
                    "small-op rows such as the reference loop and pscan several times slower)"
                    if args.threads > 1
                    else ""
                )
            )
            notes.append(warning)
            print(f"# WARNING: {warning}")
        print(f"# {args.op}: {shape_description(args)}")
        first = "u" if args.op == "selective_scan" else "x"
        print(
            f"# size of {first} at each seqlen (MiB): "
            + ", ".join(f"{seqlen}: {_input_mib(args, seqlen, dtype):.1f}" for seqlen in args.seqlens)
        )
        print(
            f"# fwd under no_grad; fwd+bwd = grads of all float inputs; median of up to {args.repeats} "
            f"after {args.warmup} warm-up; --budget-s {format(args.budget_s, 'g') if args.budget_s else 'off'}"
        )

        impls = build_impls(args, notes)
        impls_ok, checks = check_against_reference(args, impls, device, dtype, notes)
        for c in checks:
            print(
                f"# check at seqlen {c['seqlen']}: {c['impl']}: max|y - y_ref| = {c['max_abs_err']:.3g} "
                f"(max|y_ref| {c['ref_max_abs']:.3g}, bound {c['bound']:.3g}) {'ok' if c['ok'] else 'MISMATCH'}"
            )
        rows = measure(args, impls_ok, device, dtype, notes)
    fill_derived(rows, ceilings)

    print()
    print(format_table(rows))
    if notes:
        print()
        for n in notes:
            print(f"note: {n}")

    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": "scan_speed",
        "op": args.op,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "elapsed_s": None,
        "machine": info,
        "ceilings": ceilings,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "shape": shape_description(args),
        "checks": checks,
        "rows": [vars(r) for r in rows],
        "notes": notes,
    }
    title = f"{args.op} on {info['device']} ({args.device}): {shape_description(args)}"
    plot_note = write_plot(args.out / "time_vs_seqlen.png", rows, title)
    if plot_note:
        notes.append(plot_note)
        print(f"note: {plot_note}")
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    with open(args.out / "results.json", "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nwrote {args.out / 'results.json'}" + ("" if plot_note else f" and {args.out / 'time_vs_seqlen.png'}"))
    return results


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
