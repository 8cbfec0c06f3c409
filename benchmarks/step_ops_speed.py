#!/usr/bin/env python
"""Causal conv1d and the decode step: the cpu backend beside the best torch compositions, in one run.

Usage::

    python benchmarks/step_ops_speed.py            # CPU, 2 threads, fp32, the sizes of a 130M model
    python benchmarks/step_ops_speed.py --quick    # tiny sizes (CI)
    python benchmarks/step_ops_speed.py --only weight-only decode_linear   # the projections alone

Rows (each on the same inputs, median of --repeats after --warmup calls):

- conv1d fwd / fwd+bwd, (batch, dim, seqlen) with width 4, bias and silu, as a
  Mamba layer calls it: ``cpu``, the ``reference`` (a sum of width shifted
  multiplies) and ``torch F.conv1d`` (one grouped ``F.conv1d`` with padding,
  sliced to the causal part, then ``F.silu``; autograd for the backward);
- conv1d update, one decode step of (batch, dim) against a (batch, dim, width)
  state: ``cpu``, the ``reference``, and ``torch roll`` (roll the state in
  place, write the new column, multiply-sum with the weight);
- selective_state_update, one decode step in place, Mamba-1 layout (batch,
  dim, dstate) and Mamba-2 layout (batch, nheads, headdim, dstate): ``cpu``
  and the ``reference``, which is the plain torch composition (exp, multiply,
  sum over dstate);
- decode_linear, the projections of a decode step at 1, 2, 3, 4, 8 and 16 rows,
  through the 24 layers' weights in turn (so they come from memory, as in
  decoding): ``cpu`` (``decode_linear``'s kernel, called directly: the public
  function hands inner sizes below 256 to F.linear) and ``torch F.linear``.
  These rows also give the bytes moved (weights, x and y) per second, and that
  over the copy bandwidth measured in the same run (the better of a measure
  before and one after the timings): "x copy bw".
- weight-only linear, the same projections and rows with the weights stored in
  fewer bytes: ``cpu int8`` and ``cpu bf16`` (``weight_only_linear``'s kernel,
  called directly; int8 with a scale per output row), beside ``aten int8pack_mm``
  (``torch.ops.aten._weight_int8pack_mm``, torch's int8 weight-only product, on
  the same int8 weight and scales), ``torchao int8wo`` (torchao's
  ``Int8WeightOnlyConfig`` on an ``nn.Linear``, when torchao is installed),
  ``torch F.linear bf16`` (x and weight in bf16: bf16 math, not ours) and
  ``torch F.linear`` (fp32). Bytes moved count each row's own weight format.

"x fastest torch" is the fastest torch composition's time over the row's.
Results go to ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from lnlm_ssm import ops
from lnlm_ssm.ops.linear.cpu import decode_linear_cpu, weight_only_linear_cpu
from lnlm_ssm.utils.benchmark import measure_copy_bandwidth, median, tensor_bytes, time_fn, torch_threads

HERE = Path(__file__).resolve().parent
TORCH_ROWS = (
    "reference", "torch F.conv1d", "torch roll", "torch F.linear", "torch F.linear bf16", "aten int8pack_mm",
    "torchao int8wo",
)
ROWS = (1, 2, 3, 4, 8, 16)


def conv_cases(args):
    gen = torch.Generator().manual_seed(0)
    b, d, L, w = args.batch, args.conv_dim, args.seqlen, 4
    x = torch.randn(b, d, L, generator=gen)
    weight = torch.randn(d, w, generator=gen) / w
    bias = torch.randn(d, generator=gen)
    dy = torch.randn(b, d, L, generator=gen)

    def lib(backend):
        return lambda x, weight, bias: ops.causal_conv1d_fn(x, weight, bias, activation="silu", backend=backend)

    def torch_conv(x, weight, bias):
        return F.silu(F.conv1d(x, weight.unsqueeze(1), bias, padding=w - 1, groups=d)[..., :L])

    impls = {"cpu": lib("cpu"), "reference": lib("reference"), "torch F.conv1d": torch_conv}
    cases = []
    for name, fn in impls.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, weight, bias)

        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]

        def fwd_bwd(fn=fn, leaves=leaves):
            return torch.autograd.grad(fn(*leaves), leaves, dy)

        cases.append((f"conv1d fwd (b{b} d{d} l{L} w{w})", name, fwd, None))
        cases.append((f"conv1d fwd+bwd (b{b} d{d} l{L} w{w})", name, fwd_bwd, None))

    xs = torch.randn(args.decode_batch, d, generator=gen)
    state = torch.randn(args.decode_batch, d, w, generator=gen)

    def torch_roll(x, state):
        state.copy_(state.roll(-1, dims=-1))
        state[..., -1] = x
        return F.silu((state * weight).sum(-1) + bias)

    update = {
        "cpu": lambda x, s: ops.causal_conv1d_update(x, s, weight, bias, activation="silu", backend="cpu"),
        "reference": lambda x, s: ops.causal_conv1d_update(x, s, weight, bias, activation="silu", backend="reference"),
        "torch roll": torch_roll,
    }
    for name, fn in update.items():
        s = state.clone()

        def step(fn=fn, s=s):
            with torch.no_grad():
                return fn(xs, s)

        cases.append((f"conv1d update (b{args.decode_batch} d{d} w{w})", name, step, None))
    return cases


def state_update_cases(args):
    gen = torch.Generator().manual_seed(1)
    b = args.decode_batch
    cases = []
    d, n = args.dim, args.dstate
    m1 = dict(
        state=torch.randn(b, d, n, generator=gen), x=torch.randn(b, d, generator=gen),
        dt=torch.randn(b, d, generator=gen), A=-torch.rand(d, n, generator=gen),
        B=torch.randn(b, n, generator=gen), C=torch.randn(b, n, generator=gen),
        D=torch.randn(d, generator=gen), z=torch.randn(b, d, generator=gen), dt_bias=torch.randn(d, generator=gen),
    )
    h, p, n2 = args.nheads, args.headdim, args.dstate2
    m2 = dict(
        state=torch.randn(b, h, p, n2, generator=gen), x=torch.randn(b, h, p, generator=gen),
        dt=torch.randn(b, h, generator=gen)[..., None].expand(b, h, p),
        A=-torch.rand(h, generator=gen)[:, None, None].expand(h, p, n2),
        B=torch.randn(b, 1, n2, generator=gen), C=torch.randn(b, 1, n2, generator=gen),
        D=torch.randn(h, generator=gen)[:, None].expand(h, p), dt_bias=torch.randn(h, generator=gen)[:, None].expand(h, p),
    )
    for label, inputs in ((f"state update mamba1 (b{b} d{d} n{n})", m1), (f"state update mamba2 (b{b} h{h} p{p} n{n2})", m2)):
        for backend in ("cpu", "reference"):
            kw = dict(inputs, state=inputs["state"].clone())

            def step(kw=kw, backend=backend):
                with torch.no_grad():
                    return ops.selective_state_update(**kw, dt_softplus=True, backend=backend)

            cases.append((label, backend, step, None))
    return cases


def linear_cases(args):
    gen = torch.Generator().manual_seed(2)
    cases = []
    for name, out, inner, layers in args.projections:
        weights = [torch.randn(out, inner, generator=gen) / inner**0.5 for _ in range(layers)]
        for rows in ROWS:
            x = torch.randn(rows, inner, generator=gen)
            moved = sum(tensor_bytes(w, x) + rows * out * x.element_size() for w in weights)
            label = f"decode_linear {name} ({layers} x {out}x{inner}, rows {rows})"
            for impl, fn in (("cpu", decode_linear_cpu), ("torch F.linear", F.linear)):

                def project(x=x, weights=weights, fn=fn):
                    return [fn(x, w, None) for w in weights]

                cases.append((label, impl, project, moved))
    return cases


def torchao_int8_linears(weights):
    """``nn.Linear`` modules of ``weights`` quantised by torchao's int8 weight-only config, or (None, why not)."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        return None, f"torchao int8wo rows skipped: torchao is not importable ({exc})"
    linears = []
    for w in weights:
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        holder = torch.nn.Sequential(linear)  # torchao swaps the weights of the modules below the one it is given
        quantize_(holder, Int8WeightOnlyConfig())
        linears.append(holder[0])
    return linears, None


def weight_only_cases(args, notes):
    gen = torch.Generator().manual_seed(3)
    cases = []
    for name, out, inner, layers in args.projections:
        weights = [torch.randn(out, inner, generator=gen) / inner**0.5 for _ in range(layers)]
        int8 = [ops.quantize_weight(w, "int8") for w in weights]
        bf16 = [w.to(torch.bfloat16) for w in weights]
        ao, why_not = torchao_int8_linears(weights)
        if why_not and why_not not in notes:
            notes.append(why_not)
        for rows in ROWS:
            x = torch.randn(rows, inner, generator=gen)
            xb = x.to(torch.bfloat16)
            io = rows * (inner + out) * x.element_size()  # x in, y out, fp32
            impls = [
                ("cpu int8", lambda x=x, int8=int8: [weight_only_linear_cpu(x, q, s, None) for q, s in int8],
                 sum(tensor_bytes(q, s) for q, s in int8)),
                ("aten int8pack_mm", lambda x=x, int8=int8: [torch.ops.aten._weight_int8pack_mm(x, q, s) for q, s in int8],
                 sum(tensor_bytes(q, s) for q, s in int8)),
                ("cpu bf16", lambda x=x, bf16=bf16: [weight_only_linear_cpu(x, w, None, None) for w in bf16],
                 sum(tensor_bytes(w) for w in bf16)),
                ("torch F.linear bf16", lambda xb=xb, bf16=bf16: [F.linear(xb, w) for w in bf16], sum(tensor_bytes(w) for w in bf16)),
                ("torch F.linear", lambda x=x, weights=weights: [F.linear(x, w) for w in weights], sum(tensor_bytes(w) for w in weights)),
            ]
            if ao is not None:
                impls.append(("torchao int8wo", lambda x=x, ao=ao: [linear(x) for linear in ao],
                              sum(tensor_bytes(q, s) for q, s in int8)))
            label = f"weight-only {name} ({layers} x {out}x{inner}, rows {rows})"
            for impl, fn, weight_bytes in impls:

                def project(fn=fn):
                    with torch.no_grad():
                        return fn()

                cases.append((label, impl, project, weight_bytes + layers * io))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--out", type=Path, help="default benchmarks/out/step_ops-cpu-<timestamp>/")
    p.add_argument("--only", nargs="+", metavar="PREFIX",
                   help="time only the cases whose name starts with one of these (e.g. weight-only decode_linear)")
    args = p.parse_args(argv)
    # mamba-130m: d_inner 1536 (conv over d_inner), dstate 16; mamba2-130m: 24 heads of 64, dstate 128.
    sizes = dict(batch=2, conv_dim=1536, seqlen=2048, decode_batch=1, dim=1536, dstate=16, nheads=24, headdim=64, dstate2=128,
                 projections=[("in_proj", 3072, 768, 24), ("x_proj", 80, 1536, 24), ("dt_proj", 1536, 48, 24),
                              ("out_proj", 768, 1536, 24), ("lm_head", 50277, 768, 1)])
    if args.quick:
        sizes = dict(batch=1, conv_dim=64, seqlen=128, decode_batch=1, dim=64, dstate=16, nheads=4, headdim=16, dstate2=16,
                     projections=[("in_proj", 64, 256, 2), ("out_proj", 32, 128, 1)])
    for k, v in sizes.items():
        setattr(args, k, v)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 50)
    if args.out is None:
        args.out = HERE / "out" / f"step_ops-cpu-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    rows, notes = [], []
    copy_nbytes = (16 << 20) if args.quick else None
    with torch_threads(args.threads):
        copy_before = measure_copy_bandwidth("cpu", nbytes=copy_nbytes)
        cases = conv_cases(args) + state_update_cases(args) + linear_cases(args) + weight_only_cases(args, notes)
        if args.only:
            cases = [case for case in cases if case[0].startswith(tuple(args.only))]
            if not cases:
                p.error(f"--only {' '.join(args.only)} matches no case")
        for label, impl, fn, moved in cases:
            times = time_fn(fn, warmup=args.warmup, repeats=args.repeats, device="cpu")
            row = {"case": label, "impl": impl, "median_us": median(times) * 1e6, "times_s": times}
            if moved is not None:
                row["bytes"] = moved
                row["gb_per_s"] = moved / median(times) / 1e9
            rows.append(row)
        copy_after = measure_copy_bandwidth("cpu", nbytes=copy_nbytes)
    copy_bw = max(copy_before, copy_after)
    for r in rows:
        if "gb_per_s" in r:
            r["x_copy_bw"] = r["gb_per_s"] / copy_bw
    fastest_torch = {}
    for r in rows:
        if r["impl"] in TORCH_ROWS:
            fastest_torch[r["case"]] = min(fastest_torch.get(r["case"], float("inf")), r["median_us"])
    for r in rows:
        r["x_fastest_torch"] = fastest_torch[r["case"]] / r["median_us"]
    order = list(dict.fromkeys(r["case"] for r in rows))
    rows.sort(key=lambda r: order.index(r["case"]))

    width = max(len(r["case"]) for r in rows)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, fp32 activations")
    print(f"# copy bandwidth {copy_bw:.1f} GB/s (before the timings {copy_before:.1f}, after {copy_after:.1f})")
    print(f"{'case':<{width}}  {'impl':<19}  {'median us':>11}  {'x fastest torch':>15}  {'GB/s':>6}  {'x copy bw':>9}")
    for r in rows:
        line = f"{r['case']:<{width}}  {r['impl']:<19}  {r['median_us']:>11.1f}  {r['x_fastest_torch']:>15.2f}"
        if "gb_per_s" in r:
            line += f"  {r['gb_per_s']:>6.1f}  {r['x_copy_bw']:>9.2f}"
        print(line)
    for note in notes:
        print(f"note: {note}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump({"benchmark": "step_ops_speed", "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "torch": torch.__version__, "threads": args.threads, "sizes": sizes,
                   "copy_bandwidth_gb_per_s": {"before": copy_before, "after": copy_after, "used": copy_bw},
                   "rows": rows, "notes": notes}, f, indent=2)
    print(f"\nwrote {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
