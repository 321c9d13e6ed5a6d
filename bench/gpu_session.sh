#!/usr/bin/env bash
# One call of the device machine (issue 14), so that each call is a single command:
#   bash bench/gpu_session.sh check        # nvidia-smi, bench (peak, step, profile, loader), gpu tests, calibration
#   bash bench/gpu_session.sh run ARGS     # the CIFAR-10 GPU pipeline (bench/gpu_pipeline.py ARGS), gpu tests beside it
#   bash bench/gpu_session.sh suite        # the step benchmark again, then the whole suite
# It expects the repository's root as the working directory; wheels of missing packages in .whl/ (nbdev,
# papermill and their needs), CIFAR-10's JPEGs in .devdata/cifar10/train (or packed: .devdata/cifar10_train.tgz),
# and $OUT for what comes back.
set -uo pipefail
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD"
fi
if [ -f .devdata/cifar10_train.tgz ] && [ ! -d .devdata/cifar10/train ]; then  # one file travels faster than 50,000
  mkdir -p .devdata/cifar10 && tar xzf .devdata/cifar10_train.tgz -C .devdata/cifar10
fi
if [ -d .devdata/cifar10 ] && [ ! -e ../shared/data/cifar10 ]; then
  mkdir -p ../shared/data && ln -sfn "$PWD/.devdata/cifar10" ../shared/data/cifar10
fi
python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'tv', torchvision.__version__, torch.cuda.get_device_name())"
case "${1:-check}" in
check)
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  (command -v git && git rev-parse HEAD && git status --porcelain --untracked-files=no | head) > "$OUT/git.txt" 2>&1
  timeout 300 python3 bench/bench.py --only peak step profile loader --out "$OUT/bench" \
    --jpeg-src .devdata/cifar10/train > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -rA -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"; grep -E "passed|failed|PASSED|FAILED|Error|max \|a" "$OUT/gpu_tests.log" | tail -25
  timeout 120 python3 bench/gpu_pipeline.py --calibrate > "$OUT/calibrate.log" 2>&1
  echo "calibrate exit $?"; grep CALIBRATION "$OUT/calibrate.log"; tail -5 "$OUT/calibrate.log"
  python3 bench/bench.py --show --out "$OUT/bench" 2>&1 | tail -45
  ;;
run)  # the GPU pipeline, with the gpu tests beside it (the tests are not timed)
  shift
  (timeout 450 python3 -m pytest -q -s -rA -m gpu tests/test_gpu.py -p no:cacheprovider --timeout 240 \
     > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests exit $?" >> "$OUT/gpu_tests.log") &
  timeout 530 python3 bench/gpu_pipeline.py "$@" > "$OUT/pipeline.log" 2>&1
  echo "pipeline exit $?"
  python3 -c "from kdnb.pipeline import export_results; export_results('runs/cifar10-gpu', '/tmp/cifar10_gpu')" \
    && tar czf "$OUT/cifar10_gpu.tgz" -C /tmp cifar10_gpu
  wait
  grep -E "passed|failed|PASSED|FAILED|Error|max \|a|eager " "$OUT/gpu_tests.log" | tail -30; tail -12 "$OUT/pipeline.log"
  ;;
suite)  # the step benchmark again (merged into results/bench/bench_cuda.json), then the whole suite
  mkdir -p "$OUT/bench" && cp results/bench/bench_cuda.json "$OUT/bench/" 2>/dev/null
  timeout 240 python3 bench/bench.py --only peak step profile --out "$OUT/bench" > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  OMP_NUM_THREADS=2 timeout 320 python3 -m pytest -q -p no:cacheprovider -n 8 --dist loadfile \
    -k "not glue and not text" > "$OUT/suite.log" 2>&1
  echo "suite exit $?"; tail -3 "$OUT/suite.log"; grep -E "^FAILED|^ERROR" "$OUT/suite.log" | head -30
  python3 bench/bench.py --show --out "$OUT/bench" 2>&1 | head -30
  ;;
esac
