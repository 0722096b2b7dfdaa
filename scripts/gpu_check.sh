#!/usr/bin/env bash
# The GPU verification kit: on a GPU machine with nothing but this repository, one command that
# installs kdrun as the README says, runs the CUDA tests (tests/test_cuda.py), runs scripts/bench.py
# (default and CIFAR presets, the LM preset where bench.py has one, each with --peers), and writes
# one markdown report: GPU, versions, pass/fail of every test, every bench figure, time of each step.
#
#   bash scripts/gpu_check.sh [--quick] [--budget SECONDS] [--out DIR] [--no-install]
#
# --budget (default 450) bounds the whole kit, install included: a step that would run past it is
# cut short or skipped, and the report says so; the report is always written. --quick: the bench's
# smoke mode. --no-install: no pip (a re-run after a first install): .venv if there is one, else the
# Python on PATH.
# On a machine without a GPU it says so and exits 0 before installing anything.
# Exit status: 0 when every step passed, 1 otherwise, 2 for bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=outputs/gpu_check
BUDGET=450
QUICK=0
INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-install) INSTALL=0 ;;
    --budget) BUDGET="${2:-}"; shift ;;
    --out) OUT="${2:-}"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: error: unknown argument $1 (allowed: --quick, --budget SECONDS, --out DIR, --no-install)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ -z "$OUT" ]; then
  echo "gpu_check: error: --budget needs whole seconds and --out a directory (got budget '$BUDGET', out '$OUT')" >&2
  exit 2
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no GPU (nvidia-smi is not on PATH): nothing to check, nothing installed"
  exit 0
fi
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: no GPU (nvidia-smi lists none): nothing to check, nothing installed"
  exit 0
fi

START=$SECONDS
REPORT_RESERVE=20  # seconds kept for writing the report
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/*.xml "$OUT"/steps.tsv
printf 'step\tstatus\tseconds\tlimit\n' > "$OUT/steps.tsv"
FAILED=0

# step NAME LIMIT COMMAND...: run COMMAND (output in OUT/NAME.log) for at most LIMIT seconds and
# what is left of the budget; record passed / failed (exit N) / timed out / skipped in steps.tsv.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - START) - REPORT_RESERVE))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped (time budget spent)\t0\t%s\n' "$name" "$limit" >> "$OUT/steps.tsv"
    echo "gpu_check: $name skipped: the ${BUDGET}s budget is spent"
    FAILED=1
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "gpu_check: $name (at most ${limit}s) ..."
  local began=$SECONDS status
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status="timed out after ${limit}s"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - began)) "$limit" >> "$OUT/steps.tsv"
  echo "gpu_check: $name $status in $((SECONDS - began))s"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpus.csv" 2>&1

if [ "$INSTALL" -eq 1 ]; then
  # README, command 1 (the peers extra adds torchdistill for bench.py --peers).
  step install 300 bash -c "{ [ -x .venv/bin/python ] || python3 -m venv .venv; } && . .venv/bin/activate && pip install -e '.[test,peers]'"
fi
# shellcheck disable=SC1091
[ -f .venv/bin/activate ] && . .venv/bin/activate
step torch_sees_the_gpu 60 python -c "import torch; assert torch.cuda.is_available(), 'nvidia-smi lists a GPU but torch ' + torch.__version__ + ' has no CUDA (a CPU-only wheel, or a driver too old for it?)'; print(torch.cuda.get_device_name(0))"

BENCH=(--peers)
[ "$QUICK" -eq 1 ] && BENCH+=(--quick)
PRESETS=(default cifar)
if python scripts/bench.py --help 2>/dev/null | grep -q "\blm\b"; then
  PRESETS+=(lm)
fi
if grep -q "^torch_sees_the_gpu	passed" "$OUT/steps.tsv"; then
  step cuda_tests 240 python -m pytest tests/test_cuda.py -m cuda -n 0 -v -rA -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
  for preset in "${PRESETS[@]}"; do
    step "bench_$preset" 150 python scripts/bench.py --preset "$preset" "${BENCH[@]}" --out "$OUT/bench_$preset.json"
  done
else
  for name in cuda_tests "${PRESETS[@]/#/bench_}"; do
    printf '%s\tskipped (torch sees no GPU)\t0\t-\n' "$name" >> "$OUT/steps.tsv"
  done
fi

python scripts/gpu_report.py "$OUT" --seconds $((SECONDS - START)) --budget "$BUDGET" > "$OUT/report.md" \
  || { echo "gpu_check: writing the report failed" >&2; FAILED=1; }
echo "gpu_check: report in $OUT/report.md ($((SECONDS - START))s in all)"
exit "$FAILED"
