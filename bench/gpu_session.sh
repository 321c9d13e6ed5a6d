#!/usr/bin/env bash
# The device machine's calls, each one command (issues 33 and 34). A lent GPU has 15 minutes in all, starts included:
#   bash bench/gpu_session.sh check      # call 1, <= 6 min: the gpu tests, the step bench at batch 256 against the bf16
#                                        # matmul peak, both pairs, a profile, Trainer.fit with the loader's rate
#   bash bench/gpu_session.sh evidence   # call 2: the evidence_gpu pipeline into $OUT/evidence_gpu.tgz
#   bash bench/gpu_session.sh dry-run    # here, on the CPU: every command of both calls at a tiny size (the test
#                                        # suite runs it, so a renamed function or flag fails CI, not the GPU call)
# It expects the repository's root as the working directory; wheels of the packages the device image lacks in .whl/
# (bench/gpu_wheels.sh fetches them), CIFAR-10's JPEGs in .devdata/cifar10/train (or packed: .devdata/cifar10_train.tgz)
# or ../shared/data/cifar10, and $OUT for what comes back. Every step runs whatever the one before did; the exit status
# says whether any failed, and which.
set -uo pipefail
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 OUT=${OUT:-/tmp/out}
mode=${1:-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ] && [ "$mode" != dry-run ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -f .devdata/cifar10_train.tgz ] && [ ! -d .devdata/cifar10/train ]; then  # one file travels faster than 50,000
  mkdir -p .devdata/cifar10 && tar xzf .devdata/cifar10_train.tgz -C .devdata/cifar10
fi
CIFAR=../shared/data/cifar10
[ -d .devdata/cifar10/train ] && CIFAR=.devdata/cifar10

if [ "$mode" = dry-run ]; then  # the same commands on the CPU, at sizes that take seconds
  SIZE=(--tiny --device cpu); GPU_TESTS=(--collect-only -q); RUNS="$OUT/runs"
  EVIDENCE=(--device cpu --train_subset 60 --val_size 40 --img_size 32 --patch_size 8 --embed_dim 32 --num_heads 2
            --teacher_depth 2 --teacher_epochs 1 --donor_epochs 1 --distill_epochs 1 --probe_epochs 1
            --finetune_epochs 1 --batch_size 16 --seeds 1 --num_workers 0)
else
  SIZE=(); GPU_TESTS=(-q -rA); EVIDENCE=(); RUNS=runs
fi

failed=()
step() {  # step NAME LOG COMMAND...: run it with its output in $OUT/LOG, say its exit status, remember a failure
  local name=$1 log=$2; shift 2
  "$@" > "$OUT/$log" 2>&1; local rc=$?
  echo "$name exit $rc"
  [ $rc -eq 0 ] || failed+=("$name")
}

gpu_tests() {  # every test marked gpu (on the CPU: collected only, so that an import that moved fails here)
  step "gpu tests" gpu_tests.log timeout 110 $PY -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider \
    "${GPU_TESTS[@]}"
  grep -E "passed|failed|PASSED|FAILED|Error|collected|max \|a" "$OUT/gpu_tests.log" | tail -25
}

bench_check() {  # the matmul peak, the step at batch 256, both pairs, a profile; then Trainer.fit and the loader
  step bench bench.log timeout 160 $PY bench/bench.py --check "${SIZE[@]}" --only peak step pair profile \
    --out "$OUT/bench"
  step "fit and loader" bench_fit.log timeout 70 $PY bench/bench.py --check "${SIZE[@]}" --only fit loader \
    --out "$OUT/bench" --jpeg-src "$CIFAR/train"
  step "bench tables" bench_tables.txt $PY bench/bench.py --show --check "${SIZE[@]}" --out "$OUT/bench"
  tail -60 "$OUT/bench_tables.txt"
}

evidence() {  # the evidence_gpu pipeline (resumable: a later call continues it), its report folder into $OUT
  step evidence evidence.log timeout 360 $PY -m kdnb.cli pipeline --preset evidence_gpu --data_root "$CIFAR" \
    --out_dir "$RUNS/evidence_gpu" --resume auto "${EVIDENCE[@]}"
  tail -15 "$OUT/evidence.log"
  rm -rf "$OUT/evidence_gpu"
  step export export.log $PY -c \
    "from kdnb.pipeline import export_results; export_results('$RUNS/evidence_gpu', '$OUT/evidence_gpu')"
  [ -d "$OUT/evidence_gpu" ] && tar czf "$OUT/evidence_gpu.tgz" -C "$OUT" evidence_gpu && rm -rf "$OUT/evidence_gpu"
}

$PY -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'tv',
  torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
case "$mode" in
check)
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  (command -v git && git rev-parse HEAD && git status --porcelain --untracked-files=no | head) > "$OUT/git.txt" 2>&1
  gpu_tests; bench_check ;;
evidence) evidence ;;
dry-run)
  rm -rf "$RUNS/evidence_gpu"
  gpu_tests; bench_check; evidence ;;
*) echo "usage: bash bench/gpu_session.sh check|evidence|dry-run" >&2; exit 2 ;;
esac
[ ${#failed[@]} -eq 0 ] || { echo "failed: ${failed[*]}" >&2; exit 1; }
