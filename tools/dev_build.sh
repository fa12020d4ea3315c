#!/usr/bin/env bash
# Rebuild fastdiff._C in place for development (serialised with a lock: several people and
# helpers may share one checkout). FASTDIFF_CUDA defaults to 0 here for speed; pass
# FASTDIFF_CUDA=1 to check that the .cu files compile.
set -euo pipefail
cd "$(dirname "$0")/.."
export FASTDIFF_CUDA="${FASTDIFF_CUDA:-0}"
# Both flavours link the same output file, which ninja would call up to date after switching
# FASTDIFF_CUDA: remove it (under the lock) so the flavour asked for is the one relinked.
exec flock /tmp/fastdiff-build.lock sh -c 'rm -f build/lib.*/fastdiff/_C.*.so && exec "$@"' sh \
  python setup.py -q build_ext --inplace --build-temp "build/temp-cuda${FASTDIFF_CUDA}"
