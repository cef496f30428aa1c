#!/usr/bin/env bash
# Issue #16's GPU figures in one unattended run of under 8 minutes on a lent H100/H200 (python 3.12, torch 2.11,
# transformers 5.17, no vLLM, no network): transformers capture against the bare forward in bf16, trainer steps
# in bf16 with and without --compile, and the chunked head loss's peak memory against the naive loss at V = 152064
# and 262144. The teacher is a random-weight model of Llama-3.2-1B's shape (benchmarks/random_teacher.py): the
# default teacher's GGUF is not on the device, and speed does not depend on the weights.
#
# Prepare here (network), once, in the root of the checkout the device call sends: the wheels the device image
# lacks (torchdata for the trainer; zarr and its dependencies, which the rest of its needs are already there for),
# for the device's python 3.12 (9.4 MiB in all):
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"   # .git/info/exclude, in a worktree too
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     torchdata==0.11.0 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
# Run on the device (its `run` tool, carry [".whl"], timeout_s 540):
#   bash benchmarks/gpu_check.sh
# It writes $OUT/gpu_check.json (every figure), $OUT/gpu_check.md (for RESULTS.md, device named) and
# $OUT/gpu_check_logs.txt (the end of each stage's output; three files, as the tool brings back at most eight).
# A stage that fails or runs out of the time left is recorded as such; the others still run.
#
# Here, without a GPU: `bash benchmarks/gpu_check.sh --cpu-smoke` runs every stage at toy sizes on the CPU with
# .venv/bin/python (a few minutes), to check the script itself; its figures mean nothing.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/kdcache-gpu-check}
WORK=$(mktemp -d /tmp/kdcache-gpu-check.XXXXXX)
mkdir -p "$OUT"
trap 'rm -rf "$WORK"' EXIT
BUDGET=465  # seconds for all stages: under 8 minutes with the wheels' install and the summary
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ $SMOKE = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  SHAPE=tiny; DEVICE=cpu
  HF_ARGS=(--tokens 1500 --seq-len 256 --max-batch-tokens 1024 --top-k 16)
  SEQ=64; CORPUS_CHARS=20000
  STEP_ARGS=(--layers 1 --batch 2 --seq-len $SEQ --steps 1 --rounds 1 --modes ce_plain,kd_topk)
  MEM_ARGS=(--batch 1 --seq 64 --hidden 64 --topk 8)
  VOCABS=(4096 8192)
else
  PY=${PYTHON:-python3}
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "wheel install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
  fi
  SHAPE=llama-1b; DEVICE=cuda
  HF_ARGS=(--tokens 65536 --seq-len 1024 --max-batch-tokens 16384 --top-k 64)
  SEQ=1024; CORPUS_CHARS=80000  # bytes = tokens: the trainer's 2 batches of 8 x 1024 with room
  STEP_ARGS=(--layers 4 --batch 8 --seq-len $SEQ --steps 2 --rounds 3 --modes ce_plain,ce_chunked,kd_topk,kd_rskd)
  MEM_ARGS=()
  VOCABS=(152064 262144)
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# run NAME CAP CMD...: CMD with at most CAP seconds and never past the budget; its last stdout line (JSON) is kept.
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  [ $cap -gt $left ] && cap=$left
  if [ $cap -lt 10 ]; then echo "{\"stage\": \"$name\", \"status\": \"skipped: time budget spent\"}" >> "$WORK/stages.jsonl"; return; fi
  local t0=$(date +%s)
  timeout $cap "$@" > "$WORK/log_$name.txt" 2>&1
  local rc=$? secs=$(( $(date +%s) - t0 ))
  { echo "===== $name: exit $rc after ${secs}s (last 150 lines)"; tail -n 150 "$WORK/log_$name.txt"; } >> "$OUT/gpu_check_logs.txt"
  local last; last=$(grep '^{' "$WORK/log_$name.txt" | tail -1)
  [ -z "$last" ] && last=null
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"command\": \"$(echo "$*" | sed "s#$ROOT/##g; s#$WORK#\$WORK#g")\", \"figures\": $last}" >> "$WORK/stages.jsonl"
  echo "$name: rc $rc in ${secs}s" >&2
}

: > "$WORK/stages.jsonl"
: > "$OUT/gpu_check_logs.txt"
run teacher 120 $PY benchmarks/random_teacher.py "$WORK/teacher" --shape $SHAPE --device $DEVICE
run builder_hf_bf16 120 $PY benchmarks/builder_hf.py --teacher "$WORK/teacher" --dtype bfloat16 --no-results "${HF_ARGS[@]}"
# One cache for both trainer runs: stdlib source as text (the byte tokenizer makes a token of every byte).
$PY -c "import sys; from pathlib import Path; from kdcache.demo import stdlib_corpus; stdlib_corpus(Path(sys.argv[1]), int(sys.argv[2]), (1000, 20000))" "$WORK/corpus" $CORPUS_CHARS
run cache 90 $PY -m kdcache.cli build --teacher "$WORK/teacher" --corpus "$WORK/corpus" --out "$WORK/cache" \
  --top-k 64 --sample-draws 50 --seq-len $SEQ --max-batch-tokens 16384 --no-progress
run trainer_bf16 120 $PY benchmarks/trainer_step.py --cache "$WORK/cache" --precision bf16 --no-results "${STEP_ARGS[@]}"
run trainer_bf16_compile 150 $PY benchmarks/trainer_step.py --cache "$WORK/cache" --precision bf16 --compile \
  --no-memory --no-results "${STEP_ARGS[@]}"
for v in "${VOCABS[@]}"; do
  run loss_memory_$v 75 $PY benchmarks/loss_memory.py --device $DEVICE --vocab $v --no-results "${MEM_ARGS[@]}"
done

$PY - "$WORK/stages.jsonl" "$OUT" $SMOKE $SHAPE <<'EOF'
import json, platform, subprocess, sys
from pathlib import Path

stages = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
out, smoke, shape = Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
    gpu = "no nvidia-smi"
import torch, transformers
summary = {"device": gpu, "teacher_shape": shape, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu_smoke": smoke, "stages": stages}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
key = {"builder_hf_bf16": ("ratio", "capture_tok_s", "forward_tok_s", "build_end_to_end_tok_s"),
       "trainer_bf16": ("kd_over_ce_topk", "kd_over_ce_rskd", "step_seconds", "peak_bytes"),
       "trainer_bf16_compile": ("kd_over_ce_topk", "kd_over_ce_rskd", "step_seconds")}
lines = [f"### {gpu}{' (CPU SMOKE RUN: toy sizes, figures mean nothing)' if smoke else ''}", "",
         f"`bash benchmarks/gpu_check.sh{' --cpu-smoke' if smoke else ''}`: torch {torch.__version__}, transformers "
         f"{transformers.__version__}, python {platform.python_version()}; teacher: random weights of the {shape} "
         "shape (benchmarks/random_teacher.py).", "", "| stage | command | seconds | figures |", "|---|---|---|---|"]
for s in stages:
    figs = s.get("figures") or {}
    names = key.get(s["stage"]) or (("ratio", "chunk_tokens", "chunked_peak_bytes", "naive_peak_bytes",
                                     "chunked_seconds") if s["stage"].startswith("loss_memory") else ())
    shown = ", ".join(f"{n} {json.dumps(figs[n])}" for n in names if n in figs)
    status = s.get("status") or ("ok" if s.get("rc") == 0 else f"FAILED (exit {s.get('rc')}, see gpu_check_logs.txt)")
    lines.append(f"| {s['stage']} | `{s.get('command', '')}` | {s.get('seconds', '-')} | {shown or status} |")
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "total $(( $(date +%s) - START )) s; figures in $OUT/gpu_check.json and $OUT/gpu_check.md" >&2
