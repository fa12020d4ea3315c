"""The Triton kernels compile for a real GPU (sm_90 and sm_80), not only under the interpreter.

CI runs every Triton kernel with TRITON_INTERPRET=1, which accepts programs the NVIDIA compiler
rejects and knows nothing of registers or shared memory. ``tools/triton_static.py --quick``
compiles one specialization per kernel family through Triton's NVIDIA backend (to a cubin, with
Triton's own resource checks) without a GPU; run in a subprocess, since this process's kernels
are the interpreter's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia as nv
    except Exception:
        return False
    return os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))


@pytest.mark.skipif(not _nvidia_backend(), reason="needs triton's NVIDIA backend (bundled ptxas)")
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the suite compiles and runs the kernels itself"
)
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_a_gpu_target(arch, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "triton_static.py"), "--quick", "--arch", str(arch),
         "--json", str(report)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["failures"] == []
    kernels = {k["kernel"] for k in data["kernels"]}
    assert kernels >= {"_sampler_step_kernel", "_gn_fused_kernel", "_gn_stats_kernel",
                       "_gn_finalize_kernel", "_gn_apply_kernel", "_attn_fwd_kernel"}  # fmt: skip
    for k in data["kernels"]:
        assert 0 < k["regs"] <= 255 and k["shared"] >= 0, k
