#!/usr/bin/env bash
# GPU validation in one command, on a machine with CUDA:
#   1. build and install fastdiff with the CUDA kernels,
#   2. run the whole test suite with the cuda and triton backends live,
#   3. run the benchmarks (incl. the device-copy roofline),
#   4. write one JSON under benchmarks/results/ (and $OUT when set) and print a short table.
# Usage: bash benchmarks/gpu_suite.sh [tests|bench|all]   (default all)
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest" benchmarks/results
export FASTDIFF_CUDA=1 FASTDIFF_BENCH_COMPILE="${FASTDIFF_BENCH_COMPILE:-1}"
export FASTDIFF_CUDA_ARCHS="${FASTDIFF_CUDA_ARCHS:-90-real}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
# Test-only wheels (diffusers, importlib_metadata, pytest-xdist, execnet) carried to an offline
# GPU machine in .whl/.
if ls .whl/*.whl >/dev/null 2>&1 && ! python -c "import diffusers, xdist" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastdiff-site .whl/*.whl
  export PYTHONPATH="/tmp/fastdiff-site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "${FORCE_BUILD:-0}" = 1 ] || ! (cd /tmp && python -c "import fastdiff._C as c; assert c.BUILD_INFO['cuda']") 2>/dev/null; then
  echo "== build"
  pip install -q --no-build-isolation --no-deps . 2>&1 | tail -20 || exit 1
fi
python -c "import fastdiff, json; print(json.dumps(fastdiff.build_info()['backends']))"

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
stamp=$(date -u +%Y%m%dT%H%M)
# Stages run in the order given (default: tests then bench); extra pytest args via
# TEST_ARGS / BENCH_ARGS; each stage has its own timeout so one slow stage cannot eat the rest.
for stage in ${what/all/tests bench}; do
  case "$stage" in
    tests)
      echo "== tests"
      # pytest-xdist when available: the first run JIT-compiles every Triton specialization
      # (hundreds), one process at a time otherwise. TEST_WORKERS=0 runs in one process.
      workers=""
      if python -c "import xdist" 2>/dev/null; then workers="-n ${TEST_WORKERS:-8}"; fi
      timeout -s INT "${TEST_TIMEOUT:-420}" pytest tests -q -p no:cacheprovider -rf $workers \
        --junitxml="$dest/tests.xml" -o junit_family=xunit1 ${TEST_ARGS:-} >"$dest/tests.log" 2>&1
      tail -25 "$dest/tests.log"
      ;;
    bench)
      echo "== benchmarks"
      timeout -s INT "${BENCH_TIMEOUT:-420}" pytest benchmarks --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$dest/bench.json" ${BENCH_ARGS:-} >"$dest/bench.log" 2>&1
      tail -5 "$dest/bench.log"
      ;;
  esac
done
if [ -s "$dest/bench.json" ]; then
  python benchmarks/summarize.py "$dest/bench.json" --junit "$dest/tests.xml" \
    --out "$dest/gpu-$gpu-$stamp.json"
fi
