#!/usr/bin/env bash
# Everything that needs a real GPU, in one go (about 8 minutes at most on an H100):
#
#   1. versions: nvidia-smi, torch, CUDA, triton -> versions.json, nvidia-smi.txt
#   2. build: pip install --no-build-isolation --no-deps -e . with the CUDA kernels
#      for sm_90 (LNLM_SSM_CUDA=1 LNLM_SSM_CUDA_ARCHS=9.0 MAX_JOBS=16); if it fails
#      the rest runs with the Triton kernels only, and build.log says why
#   3. tests: every CUDA, Triton and flash-attn test (each backend against the reference in
#      fp32/bf16/fp16; the GPU-only ones are those skipped on CPU) -> tests.log, and
#      the scan at offsets past int32 (marked slow) -> tests-int32.log
#   4. benchmarks: scan_speed.py --device cuda for selective_scan and ssd -> JSON + PNG; on 2+ GPUs,
#      the training loop on 1 GPU, TP 2 and PP 2 (nccl) -> parallel/losses.txt
#   5. the summary table (benchmarks/gpu_summary.py), printed last -> summary.txt
#
# Run from the repository root on a machine with a CUDA GPU and a CUDA build of
# torch (+ triton) already installed; no network is needed. Results go to
# ${OUT:-benchmarks/results/gpu-<date>}/. Each step has its own time limit, so a
# hang costs only that step; a failed step is recorded and the script goes on.

set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" || exit 1
PY="${PYTHON:-python}"
STEPS="$OUT/steps.tsv"
: >"$STEPS"

# step NAME LIMIT_S LOG COMMAND...: run COMMAND with its output in LOG, record status and seconds.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (at most ${limit}s) -> $log" >&2
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) status=ok note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout note="killed after ${limit}s; see $log"
  elif [ "$rc" -ne 0 ]; then
    status=failed note="exit $rc; see $log"
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$note" >>"$STEPS"
  echo "   $status in ${took}s" >&2
  return "$rc"
}

# 1. versions
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
step versions 20 "$OUT/versions.log" "$PY" - "$OUT/versions.json" <<'EOF'
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as exc:
    info["triton"] = f"not importable ({exc})"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info["card"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
else:
    info["card"] = "no CUDA GPU visible to torch"
try:
    info["driver"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    info["driver"] = f"unknown ({exc})"
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF

# 2. build (the CUDA extension for Hopper only, to keep the build short)
if ! step build 180 "$OUT/build.log" env LNLM_SSM_CUDA=1 LNLM_SSM_CUDA_ARCHS=9.0 MAX_JOBS=16 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
  echo "   the build failed: continuing with the Triton kernels only (reason at the end of $OUT/build.log)" >&2
  tail -n 20 "$OUT/build.log" >"$OUT/build_failure.txt"
fi
"$PY" -c "import lnlm_ssm.ops as o, json; print(json.dumps(o.backend_report(), indent=2))" \
  >"$OUT/backends.json" 2>&1

# 3. tests: CUDA and Triton ones (on a GPU the Triton tests run compiled, not interpreted)
step tests 120 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/ops tests/layers tests/models tests/generation \
  -k "cuda or triton or flash" --junitxml="$OUT/tests.xml"
# The scan at element offsets past int32 (about 13 GB of bf16; marked slow, so run on its own).
step tests-int32 45 "$OUT/tests-int32.log" "$PY" -m pytest -q -rs -p no:cacheprovider -m slow -k int32 \
  tests/ops/test_selective_scan_cuda.py

# 4. benchmarks (seqlens and dtype are scan_speed's CUDA defaults; --budget-s bounds each measurement)
for op in selective_scan ssd; do
  step "bench-$op" 55 "$OUT/bench-$op.log" "$PY" benchmarks/scan_speed.py --device cuda --op "$op" \
    --budget-s 8 --out "$OUT/$op"
done

# 4b. tensor and pipeline parallelism on nccl (needs 2 GPUs): the losses of 1 GPU, TP 2 and PP 2 on one global batch
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  PAR=(--preset hybrid-tiny --model 'ssm_cfg={"layer":"Mamba2","d_state":32,"headdim":32,"chunk_size":64,"ngroups":2}'
       --steps 20 --batch-size 8 --seq-len 128 --dtype fp32 --eval-every 20 --max-bytes 2000000)
  step parallel-1gpu 90 "$OUT/parallel-1gpu.log" env CUDA_VISIBLE_DEVICES=0 "$PY" -m lnlm_ssm.train "${PAR[@]}" \
    --out "$OUT/parallel/one"
  step parallel-tp2 90 "$OUT/parallel-tp2.log" "$PY" -m torch.distributed.run --nproc-per-node 2 --standalone \
    -m lnlm_ssm.train "${PAR[@]}" --tensor-parallel 2 --out "$OUT/parallel/tp2"
  step parallel-pp2 90 "$OUT/parallel-pp2.log" "$PY" -m torch.distributed.run --nproc-per-node 2 --standalone \
    -m lnlm_ssm.train "${PAR[@]}" --pipeline-parallel 2 --microbatches 4 --out "$OUT/parallel/pp2"
  # Mamba-1 (split by channels, x_proj's all-reduce mid-layer): 1 GPU and TP 2.
  M1=(--preset mamba-tiny --steps 20 --batch-size 8 --seq-len 128 --dtype fp32 --eval-every 20 --max-bytes 2000000)
  step parallel-mamba1-1gpu 90 "$OUT/parallel-mamba1-1gpu.log" env CUDA_VISIBLE_DEVICES=0 "$PY" -m lnlm_ssm.train \
    "${M1[@]}" --out "$OUT/parallel/mamba1-one"
  step parallel-mamba1-tp2 90 "$OUT/parallel-mamba1-tp2.log" "$PY" -m torch.distributed.run --nproc-per-node 2 \
    --standalone -m lnlm_ssm.train "${M1[@]}" --tensor-parallel 2 --out "$OUT/parallel/mamba1-tp2"
  "$PY" - "$OUT/parallel" >"$OUT/parallel/losses.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
runs = {}
for name in ("one", "tp2", "pp2", "mamba1-one", "mamba1-tp2"):
    path = Path(sys.argv[1]) / name / "metrics.jsonl"
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    runs[name] = [r["loss"] for r in rows if r["kind"] == "train"]
for one, layouts in (("one", ("tp2", "pp2")), ("mamba1-one", ("mamba1-tp2",))):
    for step, ref in enumerate(runs[one], 1):
        others = "  ".join(
            f"{name} {runs[name][step - 1]:.5f} (rel {abs(runs[name][step - 1] - ref) / ref:.1e})"
            for name in layouts if len(runs[name]) >= step
        )
        print(f"step {step:3d}  {one} {ref:.5f}  {others}")
EOF
fi

# 5. the summary, last
"$PY" benchmarks/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
