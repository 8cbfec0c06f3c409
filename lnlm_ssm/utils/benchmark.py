"""Timers, machine ceilings and roofline arithmetic shared by the benchmark scripts.

What is here
------------
- :func:`time_fn`: warm-up, then one wall-clock time per repeat. On CUDA each
  repeat is bracketed by CUDA events and the device is synchronised before the
  times are read; on the CPU :func:`time.perf_counter` is used. Report the
  median (:func:`median`), not the mean: one descheduled repeat on a shared
  machine should not move the number.
- :func:`measure_copy_bandwidth`: GB/s of a large ``dst.copy_(src)``, counting
  the bytes read *and* the bytes written (2 x size), median of several copies.
  This is the machine's practical memory ceiling, not the spec-sheet number.
- :func:`measure_matmul_peak`: GFLOP/s of a square matmul (2 n^3 flops), sized
  for the device (n = 2048 on CPU, 8192 on CUDA), in the dtype asked for.
- :func:`peak_extra_memory`: the peak memory one call adds on top of what is
  already allocated (see its docstring for exactly what is counted).
- :func:`torch_threads`: a context manager that pins ``torch.set_num_threads``.
- :func:`positive_int`, :func:`learning_rate`, :func:`name_list`: ``argparse``
  types for the flags the quality benchmarks share.

Rooflines
---------
A kernel can be no faster than moving its data once, nor than doing its flops
at the matmul rate::

    t_min = max(bytes / copy_bandwidth, flops / matmul_peak)

so a :class:`Roofline` holds the two counts for one call and turns a measured
time into achieved GB/s and GFLOP/s and the fraction of each ceiling reached.

Counting rules (the benchmark scripts document their op-specific formulas):

- bytes = the *minimum* traffic: every input read once plus every output
  written once, at the tensors' own element sizes (:func:`tensor_bytes`).
  Intermediates a kernel spills to memory are not counted: they are the
  kernel's cost, not the problem's, so a kernel that spills shows a lower
  fraction of bandwidth.
- flops = the arithmetic of the formulation named in the script (one multiply
  or add = 1 flop; a transcendental such as exp is counted as 1).

The fraction of bandwidth is the meaningful ceiling for scans (they do a few
flops per byte); the fraction of matmul peak is what matters for the chunked
SSD, whose work is mostly small matmuls.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

DeviceLike = Union[str, torch.device]

__all__ = [
    "Roofline",
    "format_bytes_mib",
    "learning_rate",
    "measure_copy_bandwidth",
    "measure_matmul_peak",
    "median",
    "name_list",
    "peak_extra_memory",
    "positive_int",
    "synchronize",
    "tensor_bytes",
    "time_fn",
    "torch_threads",
]


def _device(device: DeviceLike) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device: DeviceLike) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    device: DeviceLike,
    budget_s: Optional[float] = None,
) -> list[float]:
    """Run ``fn()`` ``warmup`` times untimed, then return ``repeats`` times in seconds.

    ``budget_s`` (optional) caps the wall time spent on the timed repeats: once
    it is used up no further repeat starts, so fewer than ``repeats`` times may
    come back (always at least one).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = _device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    if device.type == "cuda":
        # Events per repeat, read after one synchronize: no host sync between repeats.
        events = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
            if budget_s is not None:
                end.synchronize()
                if time.perf_counter() - started > budget_s:
                    break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if budget_s is not None and time.perf_counter() - started > budget_s:
                break
    return times


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; ``None`` leaves it alone."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_copy_bandwidth(device: DeviceLike, *, nbytes: Optional[int] = None, repeats: int = 7) -> float:
    """Copy bandwidth in GB/s (1e9 bytes/s), counting read + write bytes.

    The buffer defaults to 256 MiB on the CPU (well beyond any last-level cache)
    and 1 GiB on CUDA. Both buffers are touched before timing so that page
    faults are not measured.
    """
    device = _device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    times = time_fn(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device)
    moved = 2 * n * src.element_size()
    return moved / median(times) / 1e9


def measure_matmul_peak(
    device: DeviceLike, dtype: torch.dtype = torch.float32, *, n: Optional[int] = None, repeats: int = 5
) -> float:
    """Square-matmul throughput in GFLOP/s (2 n^3 flops per product).

    ``n`` defaults to 2048 on the CPU and 8192 on CUDA: large enough to reach
    the BLAS's steady state, small enough to take well under a second.
    """
    device = _device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: torch.mm(a, b, out=out), warmup=2, repeats=repeats, device=device)
    return 2 * n**3 / median(times) / 1e9


def tensor_bytes(*tensors: Optional[torch.Tensor]) -> int:
    """Bytes held by the given tensors' elements (``None`` entries count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class Roofline:
    """Minimum bytes and flops of one call, turned into achieved rates for a time."""

    bytes: int
    flops: int

    def bound_s(self, bandwidth_gbps: float, peak_gflops: float) -> float:
        """The roofline's lower bound on the time of one call, in seconds."""
        return max(self.bytes / (bandwidth_gbps * 1e9), self.flops / (peak_gflops * 1e9))

    def achieved(self, seconds: float, bandwidth_gbps: float, peak_gflops: float) -> dict[str, float]:
        """GB/s, GFLOP/s and the fraction of each ceiling reached in ``seconds``."""
        gbps = self.bytes / seconds / 1e9
        gflops = self.flops / seconds / 1e9
        return {
            "gbps": gbps,
            "gflops": gflops,
            "frac_bandwidth": gbps / bandwidth_gbps,
            "frac_matmul_peak": gflops / peak_gflops,
        }


# ---------------------------------------------------------------------------
# Peak memory of one call
# ---------------------------------------------------------------------------


def peak_extra_memory(fn: Callable[[], object], device: DeviceLike) -> dict[str, Optional[int]]:
    """Peak bytes that one ``fn()`` call adds on top of what is allocated before it.

    Returns a dict (values ``None`` when the measure is not available here):

    - ``"torch_bytes"``: bytes of tensors allocated by torch's allocator. On
      CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation at the
      start. On the CPU: the call is run under ``torch.profiler`` with
      ``profile_memory=True`` and the signed allocation events are summed in
      time order; the maximum of that running sum is the peak. Tensors freed
      before they are reused count once each, exactly like the CUDA number.
      Memory a kernel obtains outside torch's allocator (e.g. ``std::vector``
      scratch in a C++ kernel) is *not* seen by this measure.
    - ``"rss_bytes"`` (Linux CPU only): growth of the process's resident set.
      Freed heap memory is first returned to the OS (``malloc_trim``), the
      kernel's high-water mark is reset (``/proc/self/clear_refs``), and the
      answer is ``VmHWM`` after the call minus ``VmRSS`` before it. This sees
      every allocation, torch or not, but also allocator slack and
      fragmentation, so read it as an upper estimate.

    Gradients produced by the call count, since a caller has to hold them.
    Run ``fn`` once beforehand so that one-time initialisation is not counted,
    and drop references to earlier results first (``gc.collect()`` if they may
    sit in reference cycles): memory still held is part of the baseline.
    """
    device = _device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"torch_bytes": torch.cuda.max_memory_allocated(device) - before, "rss_bytes": None}
    return {"torch_bytes": _cpu_torch_peak(fn), "rss_bytes": _rss_peak(fn)}


@contextlib.contextmanager
def _c_output_discarded() -> Iterator[None]:
    """File descriptors 1 and 2 go to /dev/null for the block; C's buffered output is flushed there before they return."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        flush_c_streams = ctypes.CDLL(None).fflush
    except (OSError, TypeError, AttributeError):  # no C library to load by name (Windows)
        flush_c_streams = None
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        if flush_c_streams is not None:
            flush_c_streams(None)
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _cpu_torch_peak(fn: Callable[[], object]) -> Optional[int]:
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # Kineto prints "USDT: ... profiler_start" / "profiler_stop" lines through C's stdout at start and
    # stop, into the benchmark's own output: those two calls run with the process's output discarded.
    with _c_output_discarded():
        prof.start()
    try:
        fn()
    finally:
        with _c_output_discarded():
            prof.stop()
    try:
        # The event tree is how torch's own memory profiler reads allocations;
        # it is not a stable API, so any change there degrades to "unknown".
        roots = prof.profiler.kineto_results.experimental_event_tree()
        events = []
        stack = list(roots)
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
                events.append((node.start_time_ns, node.typed[1].alloc_size))
    except (AttributeError, IndexError, TypeError):
        return None
    events.sort(key=lambda e: e[0])
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def _read_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_peak(fn: Callable[[], object]) -> Optional[int]:
    if not sys.platform.startswith("linux"):
        return None
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _read_status_kb("VmRSS")
    fn()
    peak = _read_status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def format_bytes_mib(nbytes: Optional[int]) -> str:
    """``"123.4"`` MiB, or ``"-"`` for an unknown value."""
    if nbytes is None or (isinstance(nbytes, float) and math.isnan(nbytes)):
        return "-"
    return f"{nbytes / 2**20:.1f}"


# ---------------------------------------------------------------------------- flags


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def learning_rate(text: str) -> float:
    """``argparse`` type: a learning rate, > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a learning rate must be > 0; got {text!r}")
    return value


def name_list(flag: str, choices: Sequence[str]) -> Callable[[str], list[str]]:
    """``argparse`` type of ``flag``: a comma list of ``choices``, duplicates dropped, in the order given."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma list of {list(choices)}; got {text!r}")
        return list(dict.fromkeys(names))

    return parse
