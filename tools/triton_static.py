"""Compile fastdiff's Triton kernels for a CUDA GPU without one, and report their resources.

The Triton interpreter (how CI runs the kernels on CPU) accepts programs the real compiler
rejects, and says nothing about registers, spills or shared memory. This tool runs the real
launchers (``sampler_step``, ``group_norm_silu``, ``attention``) on CPU tensors under a stub
Triton driver whose target is an NVIDIA GPU: every specialization they launch, every autotuning
config included, goes through the real NVIDIA backend (TTIR -> TTGIR -> LLVM -> PTX -> ptxas ->
cubin), and nothing runs. Triton's own launch-time resource check (shared memory against the
target's per-block limit) runs too. For each compiled kernel it reports registers per thread,
spill (local) bytes and shared memory, read from the cubin with the bundled ``cuobjdump``.

    python tools/triton_static.py                 # sm_90, every case, table on stdout
    python tools/triton_static.py --arch 80 --json report.json
    python tools/triton_static.py --quick         # one case per kernel family (the CI check)

Exit status 1 when a kernel fails to compile or exceeds a limit. Needs triton with its NVIDIA
backend (ptxas is bundled); never set TRITON_INTERPRET for it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

# per-block shared memory limits (bytes) of the targets (opt-in maximum), SM counts for the plans
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_SMS = {80: 108, 86: 84, 89: 128, 90: 132}


def _install_stub_driver(arch: int) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return None, None, 0, 0, 1024  # module, function, n_regs, n_spills, max threads

        def get_device_properties(self, device):
            return {"max_shared_mem": _SHARED_LIMIT[arch], "multiprocessor_count": _SMS[arch],
                    "max_num_regs": 65536, "warpSize": 32}  # fmt: skip

    class Launcher:
        def __init__(self, src, metadata):
            pass

        def __call__(self, *args, **kwargs):
            pass  # compile only: nothing runs

    class StubDriver:
        target = GPUTarget("cuda", arch, 32)
        utils = Utils()
        launcher_cls = Launcher

        def is_active(self):
            return True

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            def bench(fn, *args, **kwargs):
                fn()  # compiles the config (a config over a limit raises: the tuner drops it)
                q = kwargs.get("quantiles")  # then all tie: the tuner keeps the first that compiled
                return [1.0] * len(q) if q else 1.0

            return bench

        def get_empty_cache_for_benchmark(self):
            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    driver.set_active(StubDriver())


# ---- the cases: the launchers called as the ops call them ------------------------------------
def _sampler_cases(quick: bool):
    from fastdiff.ops.sampler_step import _run_kernel

    coef = torch.rand(8)
    gen = torch.tensor([1234, 0])
    variants = [
        (torch.float32, "nchw", dict(gen=True, clip=1.0)),
        (torch.float16, "nhwc", dict(gen=True, cfg=3.0, pred=1)),
        (torch.bfloat16, "nchw", dict(noise=True, lv=True)),
        (torch.float32, "nchw", dict(pred=2, clip=1.0, recompute=True)),
    ]
    for dt, layout, o in variants[:1] if quick else variants:
        x = torch.randn(2, 4, 16, 16, dtype=dt)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        rows = 2 if o.get("cfg") else 1
        c = 8 if o.get("lv") else 4
        mo = torch.randn(2 * rows, c, 16, 16, dtype=dt)
        z = torch.randn_like(x) if o.get("noise") else None
        _run_kernel("triton", 0, x, mo, coef, z, gen if o.get("gen") else None, o.get("pred", 0),
                    o.get("clip"), o.get("recompute", False), o.get("cfg"), bool(o.get("lv")),
                    True)  # fmt: skip
        if not quick and dt == torch.float32 and layout == "nchw":  # DPM-Solver++ 2M
            _run_kernel("triton", 1, x, mo[: x.shape[0]], coef, torch.randn_like(x), None, 0,
                        None, False, None, False, True)  # fmt: skip
        yield f"sampler_step {dt} {layout} {sorted(o)}"


def _gn_cases(quick: bool):
    from fastdiff.kernels.triton import group_norm_silu as gk

    shapes = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (16, 128, 32, 32),
              (2, 1280, 8, 8), (1, 64, 7, 7)]  # fmt: skip
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    combos = [(s, dt, lay) for s in shapes for dt in dtypes for lay in ("nchw", "nhwc")]
    if quick:
        # the fused plan (NCHW), the split plan in both layouts
        combos = [((2, 1280, 8, 8), torch.float16, "nchw"), ((2, 640, 32, 32), torch.float16,
                  "nchw"), ((2, 320, 64, 64), torch.float16, "nhwc")]  # fmt: skip
    for k, (shape, dt, lay) in enumerate(combos):
        n, c = shape[:2]
        x = torch.randn(shape, dtype=dt)
        if lay == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, dtype=dt), torch.randn(c, dtype=dt)
        add = torch.randn(n, c, dtype=dt) if k % 2 == 0 else None
        ss = torch.randn(n, 2 * c, dtype=dt).chunk(2, dim=1) if k % 3 == 1 else (None, None)
        gk.group_norm_silu_forward(x, torch.empty_like(x), 32, w, b, 1e-5, add, *ss, True,
                                   nhwc=lay == "nhwc")  # fmt: skip
        yield f"group_norm_silu {shape} {dt} {lay}"


def _attention_cases(quick: bool):
    from fastdiff.kernels.triton import attention as ak

    ak._interpreting = lambda t: False  # launch as on a GPU: the autotuned configs
    heads = [32, 40, 64, 80, 96, 128, 160]
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    combos = [(d, dt) for d in heads for dt in dtypes]
    if quick:
        combos = [(40, torch.float16)]
        one = ak.triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3)
        ak._configs = lambda: [one]
    for d, dt in combos:
        q = torch.randn(1, 2, 77, d, dtype=dt)
        k = torch.randn(1, 2, 256, d, dtype=dt)
        ak._autotuned = None  # one autotuner per case: every config compiles
        ak.attention_forward(q, k, torch.randn_like(k), d**-0.5)
        yield f"attention D={d} {dt}"


# ---- the report ------------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def _resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    finally:
        os.unlink(f.name)
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {"regs": int(fields["REG"]), "local_bytes": int(fields["LOCAL"]),
            "static_shared": int(fields["SHARED"])}  # fmt: skip


def _compiled_kernels():
    from fastdiff.kernels.triton import attention, group_norm_silu, sampler_step

    fns = [sampler_step._sampler_step_kernel, group_norm_silu._gn_fused_kernel,
           group_norm_silu._gn_stats_kernel, group_norm_silu._gn_finalize_kernel,
           group_norm_silu._gn_apply_kernel, attention._attn_fwd_kernel]  # fmt: skip
    for fn in fns:
        names = fn.arg_names
        for caches in fn.device_caches.values():
            for ck in caches[0].values():
                consts = {
                    names[i[0]]: v
                    for i, v in ck.src.constants.items()
                    if isinstance(i, tuple) and len(i) == 1 and names[i[0]].isupper()
                }
                ptrs = sorted({t for t in ck.src.signature.values() if str(t).startswith("*")})
                yield fn.__name__, consts, ptrs, ck


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(_SHARED_LIMIT))
    ap.add_argument("--quick", action="store_true", help="one case per kernel family")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: this tool compiles for a real GPU target", file=sys.stderr)
        return 2
    import fastdiff.kernels.triton.group_norm_silu as gk

    _install_stub_driver(args.arch)
    gk._sm_count_of = lambda device: _SMS[args.arch]
    failures = []
    for cases in (_sampler_cases, _gn_cases, _attention_cases):
        try:
            for name in cases(args.quick):
                print(f"compiled: {name}", file=sys.stderr)
        except Exception as exc:  # a compile error or a resource limit: report, go on
            failures.append(f"{cases.__name__}: {type(exc).__name__}: {exc}")
            print(f"FAILED {failures[-1]}", file=sys.stderr)
    rows = []
    for kname, consts, ptrs, ck in _compiled_kernels():
        res = _resources(ck.asm["cubin"])
        md = ck.metadata
        row = {"kernel": kname, "constexprs": consts, "pointer_types": ptrs,
               "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
               **res}  # fmt: skip
        if res["local_bytes"]:
            row["warning"] = "spills to local memory"
        if md.shared > _SHARED_LIMIT[args.arch]:
            row["warning"] = "over the shared-memory limit: the autotuner drops this config"
        if res["regs"] * 32 * md.num_warps > 65536:
            failures.append(f"{kname} {consts}: {res['regs']} regs x {32 * md.num_warps} threads")
        rows.append(row)
    width = max((len(r["kernel"]) for r in rows), default=10)
    print(f"{'kernel':{width}}  warps stages  regs  spill  shared  constexprs / pointer types")
    for r in sorted(rows, key=lambda r: (r["kernel"], -r["local_bytes"], -r["regs"])):
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        ptrs = ",".join(r["pointer_types"])
        print(f"{r['kernel']:{width}}  {r['num_warps']:5} {r['num_stages']:6} {r['regs']:5} "
              f"{r['local_bytes']:6} {r['shared']:7}  {consts} {ptrs}")  # fmt: skip
    spills = sum(1 for r in rows if r["local_bytes"])
    over = sum(1 for r in rows if r["shared"] > _SHARED_LIMIT[args.arch])
    print(
        f"sm_{args.arch}: {len(rows)} kernels compiled, {spills} spill, {over} over the "
        f"shared-memory limit (autotuning configs it drops), {len(failures)} failures"
    )
    for f in failures:
        print(f"FAILURE: {f}")
    if args.json:
        import triton

        meta = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__}
        with open(args.json, "w") as fh:
            json.dump({"env": meta, "kernels": rows, "failures": failures}, fh, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
