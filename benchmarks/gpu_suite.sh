#!/usr/bin/env bash
# GPU validation in one command, on a machine with CUDA:
#   1. build and install fastdiff with the CUDA kernels,
#   2. run the whole test suite with the cuda and triton backends live,
#   3. run the benchmarks (incl. the device-copy roofline),
#   4. write one JSON under $OUT when set, else benchmarks/results/, print a short table, and
#      plot the end-to-end time per step (PNG).
# Usage: bash benchmarks/gpu_suite.sh [tests|bench|e2e-compile|all]   (default all = tests bench)
# e2e-compile: the end-to-end runs again with torch.compile(mode="max-autotune*") beside eager and
# fastdiff (issue 6's comparison, same run); autotuning takes minutes per model, so it is its own
# stage with its own timeout (COMPILE_TIMEOUT, 1500 s) and JSON/PNG.
# Environment: FORCE_BUILD=1 (rebuild even if a CUDA build is installed), FASTDIFF_BENCH_COMPILE=0
# (skip the torch.compile variants), TEST_ARGS / BENCH_ARGS (extra pytest words, split on spaces),
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds per stage, 420), TEST_WORKERS (pytest-xdist, 14; 0 = one
# process), FASTDIFF_CUDA_ARCHS (90-real), MAX_JOBS (16).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
what="${1:-all}"
# Checked before anything else: a typo (or --help) must not start a CUDA build first.
for stage in ${what/all/tests bench}; do
  case "$stage" in
    tests | bench | e2e-compile) ;;
    *)
      echo "usage: bash benchmarks/gpu_suite.sh [tests|bench|e2e-compile|all]  (stages may be combined: \"bench tests\")"
      exit 2
      ;;
  esac
done
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest" benchmarks/results
export FASTDIFF_CUDA=1 FASTDIFF_BENCH_COMPILE="${FASTDIFF_BENCH_COMPILE:-1}"
export FASTDIFF_CUDA_ARCHS="${FASTDIFF_CUDA_ARCHS:-90-real}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
# Test-only wheels (diffusers, importlib_metadata, pytest-xdist, execnet) carried to an offline
# GPU machine in .whl/.
# Build tools for the offline build (pybind11, cmake, ninja wheels) may be carried there too; their
# executables land in /tmp/fastdiff-site/bin.
if ls .whl/*.whl >/dev/null 2>&1 && ! python -c "import diffusers, xdist, pybind11" 2>/dev/null; then
  python -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/fastdiff-site \
    .whl/*.whl
  export PYTHONPATH="/tmp/fastdiff-site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$PATH:/tmp/fastdiff-site/bin"
fi

# Checks run from /tmp: from the checkout, `python -c` would import the source tree's fastdiff/
# (no _C there) instead of the installed build.
has_cuda_build() { (cd /tmp && python -c "import fastdiff._C as c; assert c.BUILD_INFO['cuda']") 2>/dev/null; }
if [ "${FORCE_BUILD:-0}" = 1 ] || ! has_cuda_build; then
  echo "== build"
  # --no-build-isolation (the GPU machine is offline): the build requirements must be installed.
  missing=""
  for mod in setuptools pybind11; do
    python -c "import $mod" 2>/dev/null || missing="$missing $mod"
  done
  # pyproject's SPDX `license` string needs setuptools >= 77 (PEP 639)
  python -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
    2>/dev/null || missing="$missing setuptools>=77"
  command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ] || missing="$missing nvcc"
  for tool in cmake ninja; do command -v $tool >/dev/null || missing="$missing $tool"; done
  if [ -n "$missing" ]; then
    echo "gpu_suite: cannot build fastdiff._C with CUDA, missing:$missing (python packages and"
    echo "  cmake/ninja: carry their wheels in .whl/; nvcc: put it on PATH or set CUDACXX)"
    exit 1
  fi
  python -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -20 || exit 1
  has_cuda_build || { echo "gpu_suite: the installed fastdiff._C has no CUDA kernels"; exit 1; }
fi
(cd /tmp && python -c "import fastdiff, json; print(json.dumps(fastdiff.build_info()['backends']))")

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))")
stamp=$(date -u +%Y%m%dT%H%M)
# The op-level benchmarks first (never run on a GPU yet), the end-to-end runs (measured) last, so
# that a timeout cuts the latter.
bench_files=(benchmarks/bench_copy.py)
for f in benchmarks/bench_*.py; do
  case "$f" in */bench_copy.py | */bench_e2e.py) ;; *) bench_files+=("$f") ;; esac
done
bench_files+=(benchmarks/bench_e2e.py)
# The kernel test files first, then the rest: a stage cut by its timeout has run them.
test_files=(tests/test_sampler_step.py tests/test_step_numerics.py tests/test_stage2_precision.py tests/test_dpm_sde.py tests/test_dpm3_op.py tests/test_dpm_hist_op.py tests/test_dpm3.py tests/test_unipc.py tests/test_unipc3.py tests/test_group_norm_silu.py
  tests/test_attention.py tests/test_attn_processor.py tests/test_compile_backend.py
  tests/test_kdpm2.py tests/test_heun.py tests/test_pndm.py tests/test_lcm.py tests/test_flow.py tests/test_flow_heun.py
  tests/test_lms.py tests/test_deis.py tests/test_dpm_single.py tests/test_edm.py tests/test_guidance_rescale.py
  tests/test_custom_grid_steps.py tests/test_custom_grid2.py tests/test_unoptimize.py
  tests/test_img2img.py tests/test_inversion.py tests/test_inversion_flow.py tests/test_sampler_contract.py
  tests/test_inpaint.py tests/test_repaint.py tests/test_repaint_graph.py tests/test_edm_sigmas.py
  tests/test_flow_multistep.py tests/test_consistency.py
  tests/test_ipndm.py tests/test_cosine_dpm.py tests/test_sa_solver.py tests/test_flow_single_deis.py
  tests/test_fractional_timesteps.py tests/test_dpm_single_sde.py tests/test_zero_snr32.py
  tests/test_dpmpp_sde.py tests/test_dpm_inverse.py)
for f in tests/test_*.py; do
  case " ${test_files[*]} " in *" $f "*) ;; *) test_files+=("$f") ;; esac
done
junit=()
# Stages run in the order given (default: tests then bench); extra pytest args via
# TEST_ARGS / BENCH_ARGS; each stage has its own timeout so one slow stage cannot eat the rest.
for stage in ${what/all/tests bench}; do
  case "$stage" in
    tests)
      echo "== tests"
      # pytest-xdist when available: the first run JIT-compiles every Triton specialization
      # (hundreds), one process at a time otherwise. TEST_WORKERS=0 runs in one process.
      workers=""
      if python -c "import xdist" 2>/dev/null; then workers="-n ${TEST_WORKERS:-14}"; fi
      rm -f "$dest/tests.xml"
      # shellcheck disable=SC2086  # $workers and $TEST_ARGS are word lists
      # A test that loses the CUDA context ends its xdist worker (tests/conftest.py).
      timeout -s INT "${TEST_TIMEOUT:-420}" pytest "${test_files[@]}" -q -p no:cacheprovider \
        -rf --durations=30 $workers --junitxml="$dest/tests.xml" -o junit_family=xunit1 \
        ${TEST_ARGS:-} >"$dest/tests.log" 2>&1
      tail -25 "$dest/tests.log"
      [ -s "$dest/tests.xml" ] && junit=(--junit "$dest/tests.xml")
      ;;
    bench)
      echo "== benchmarks"
      rm -f "$dest/bench.json"
      ran_bench=1
      # shellcheck disable=SC2086  # $BENCH_ARGS is a word list
      timeout -s INT "${BENCH_TIMEOUT:-420}" pytest "${bench_files[@]}" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$dest/bench.json" ${BENCH_ARGS:-} >"$dest/bench.log" 2>&1
      grep -iE "passed|failed|error|no tests ran" "$dest/bench.log" | tail -3
      ;;
    e2e-compile)
      echo "== end to end with torch.compile (max-autotune: minutes per model)"
      rm -f "$dest/e2e-compile.json"
      ran_compile=1
      # shellcheck disable=SC2086  # $BENCH_ARGS is a word list
      FASTDIFF_BENCH_E2E_COMPILE=1 timeout -s INT "${COMPILE_TIMEOUT:-1500}" pytest benchmarks/bench_e2e.py \
        --benchmark-only -q -p no:cacheprovider --benchmark-json="$dest/e2e-compile.json" \
        ${BENCH_ARGS:-} >"$dest/e2e-compile.log" 2>&1
      grep -iE "passed|failed|error|no tests ran" "$dest/e2e-compile.log" | tail -3
      ;;
  esac
done
# Only what this invocation ran is summarized (a stale JSON of an earlier run is not).
if [ -n "${ran_bench:-}" ] && [ -s "$dest/bench.json" ]; then
  # One command may not hold both stages (a lent GPU allows 10 minutes per command): the tests
  # of an earlier `gpu_suite.sh tests` in the same $dest are attached, and said to be.
  if [ ${#junit[@]} -eq 0 ] && [ -s "$dest/tests.xml" ]; then
    echo "gpu_suite: attaching $dest/tests.xml of an earlier tests stage"
    junit=(--junit "$dest/tests.xml")
  fi
  python benchmarks/summarize.py "$dest/bench.json" ${junit[@]+"${junit[@]}"} --out "$dest/gpu-$gpu-$stamp.json"
  python benchmarks/plot_e2e.py "$dest/bench.json" --out "$dest/e2e-$gpu-$stamp.png" ||
    echo "gpu_suite: no e2e plot (matplotlib missing or no e2e case)"
fi
if [ -n "${ran_compile:-}" ] && [ -s "$dest/e2e-compile.json" ]; then
  python benchmarks/summarize.py "$dest/e2e-compile.json" --out "$dest/gpu-$gpu-$stamp-e2e-compile.json"
  python benchmarks/plot_e2e.py "$dest/e2e-compile.json" --out "$dest/e2e-compile-$gpu-$stamp.png" ||
    echo "gpu_suite: no e2e-compile plot (matplotlib missing or no e2e case)"
fi
