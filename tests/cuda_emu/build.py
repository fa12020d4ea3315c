"""Build fastdiff._C with csrc/cuda/*.cu compiled for the CPU emulator (fd_cuda_emu.h).

The .cu files are copied with three mechanical rewrites, nothing else changes:
* ``kernel<targs><<<grid, block, smem, stream>>>(args);`` becomes
  ``fd_emu::launch([&] { kernel<targs>(args); }, grid, block, smem, stream);``
* ``extern __shared__ T name[];`` becomes ``T* name = reinterpret_cast<T*>(fd_emu::dyn_smem());``
* ``__shared__ T name[...];`` (a function static in the emulator) is followed by
  ``fd_emu::poison_shared(name, sizeof(name));``: garbage at the start of every block.

Then g++ builds one module from bindings.cpp, bind_*.cpp, cpu/*.cpp, the rewritten .cu files and
the emulator's runtime, with FASTDIFF_WITH_CUDA (so the bindings expose the ``*_cuda`` entry
points) and FASTDIFF_CUDA_EMU. The emulated translation units are built with UBSan's alignment,
bounds and overflow checks (reports logged, see SANITIZE). Results are cached by a hash of every
input.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
# UBSan on the kernels. Out-of-bounds array indices, signed overflow and bad shifts are reported
# on stderr and the run goes on (tests/test_cuda_emu.py fails the test that printed a report).
# A misaligned access (a GPU's "misaligned address" error) stops the process at once: the
# aligned vector load that follows would fault anyway. Under pytest's output capture that report
# is lost; rerun the failing test with -s to read it.
SANITIZE = ["-fsanitize=alignment,bounds,signed-integer-overflow,shift,vla-bound",
            "-fno-sanitize-recover=alignment"]  # fmt: skip
# FASTDIFF_EMU_ASAN=1 adds AddressSanitizer to the kernels (out-of-bounds reads and writes of
# global and shared memory). Run python with LD_PRELOAD="$(g++ -print-file-name=libasan.so)"
# and ASAN_OPTIONS=detect_leaks=0. Not used by the test suite (it needs the preload).
if os.environ.get("FASTDIFF_EMU_ASAN") == "1":
    SANITIZE = [*SANITIZE, "-fsanitize=address"]


def cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (for cuda_fp16.h & co.), or None."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(os.path.realpath(nvcc))
        cands.append(real.parent.parent / "include")
    cands += sorted(Path("/usr/local").glob("cuda*/include"), reverse=True)
    for c in cands:
        if (c / "cuda_fp16.h").is_file() and (c / "driver_types.h").is_file():
            return c
    return None


_LAUNCH = re.compile(r"(\b[A-Za-z_]\w*(?:\s*<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SMEM = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(\w+)\s+(\w+)\s*\[\s*\]\s*;"
)


_STATIC_SMEM = re.compile(
    r"(__shared__\s+(?:__align__\(\d+\)\s+)?[\w:]+\s+(\w+)\s*(?:\[[^\];]+\])+\s*;)"
)


def translate(src: str) -> str:
    """Rewrite the launches and shared memory of one .cu file (see the module doc)."""
    src = _EXTERN_SMEM.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::fd_emu::dyn_smem());", src
    )
    src = _STATIC_SMEM.sub(
        lambda m: f"{m[1]} ::fd_emu::poison_shared({m[2]}, sizeof({m[2]}));", src
    )
    out, pos = [], 0
    for m in _LAUNCH.finditer(src):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:  # the matching ')' of the argument list
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        args = src[m.end() : i - 1]
        semi = src.index(";", i)
        if src[i:semi].strip():
            raise ValueError(f"unexpected text after a launch: {src[i:semi]!r}")
        out.append(src[pos : m.start()])
        out.append(f"::fd_emu::launch([&]() {{ {m[1]}({args}); }}, {m[2]});")
        pos = semi + 1
    out.append(src[pos:])
    return "".join(out)


def _inputs() -> list[Path]:
    files = sorted(CSRC.rglob("*.cpp")) + sorted(CSRC.rglob("*.cu")) + sorted(CSRC.rglob("*.h"))
    files += sorted(CSRC.rglob("*.cuh")) + sorted(HERE.glob("*.h")) + sorted(HERE.glob("*.cpp"))
    return files + [Path(__file__)]


def build(out_dir: Path | None = None, jobs: int = 2) -> Path:
    """Build (or reuse) the emulated module; returns the path of the ``_C`` extension file."""
    inc = cuda_include()
    if inc is None:
        raise RuntimeError("CUDA headers (cuda_fp16.h) not found: set CUDA_HOME")
    import pybind11

    h = hashlib.sha256()
    for f in _inputs():
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    for part in (sys.version, " ".join(SANITIZE), gxx, str(inc), pybind11.__version__):
        h.update(part.encode())
    h.update((inc / "cuda_fp16.h").read_bytes())
    key = h.hexdigest()[:16]
    cache = Path(os.environ.get("FASTDIFF_EMU_CACHE", Path.home() / ".cache" / "fastdiff-cuda-emu"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: a per-user temporary directory
        cache = Path(tempfile.gettempdir()) / f"fastdiff-cuda-emu-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
    final = out_dir or cache / key
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = final / f"_C{suffix}"
    if target.is_file():
        return target
    # build in a private directory, then rename it into place (concurrent builds do not mix)
    out_dir = final.parent / f"{final.name}.tmp{os.getpid()}"
    shutil.rmtree(out_dir, ignore_errors=True)
    gen = out_dir / "gen"
    objs = out_dir / "obj"
    gen.mkdir(parents=True, exist_ok=True)
    objs.mkdir(parents=True, exist_ok=True)

    common = ["g++", "-std=c++17", "-fPIC", "-O1", "-g0", "-fopenmp", "-DFASTDIFF_WITH_OPENMP=1",
              "-DFASTDIFF_WITH_CUDA=1", "-DFASTDIFF_CUDA_EMU=1",
              '-DFASTDIFF_CUDA_ARCHS_STR="emulated"', '-DFASTDIFF_CUDA_COMPILER="fd_cuda_emu"',
              '-DFASTDIFF_CXX_COMPILER="g++ (CUDA emulator build)"',
              f"-I{HERE}", f"-I{CSRC / 'include'}", f"-I{inc}", f"-I{pybind11.get_include()}",
              f"-I{sysconfig.get_paths()['include']}"]  # fmt: skip
    units: list[tuple[Path, list[str]]] = []
    plain = [
        CSRC / "bindings.cpp",
        *sorted(CSRC.glob("bind_*.cpp")),
        *sorted((CSRC / "cpu").glob("*.cpp")),
    ]
    units += [(f, []) for f in plain]
    for f in sorted(CSRC.glob("cuda/*.cu")):
        g = gen / (f.stem + "_cu.cpp")
        g.write_text(f'#line 1 "{f}"\n' + translate(f.read_text()))
        units.append((g, ["-include", "fd_cuda_emu.h", *SANITIZE]))
    units.append((HERE / "fd_cuda_emu.cpp", ["-O2"]))

    def compile_one(unit: tuple[Path, list[str]]) -> Path:
        src, extra = unit
        obj = objs / (src.parent.name + "_" + src.stem + ".o")
        cmd = [*common, *extra, "-c", str(src), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling {src} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
        obj_files = list(ex.map(compile_one, units))
    so = out_dir / f"_C{suffix}"
    link = ["g++", "-shared", "-fopenmp", *SANITIZE, *map(str, obj_files), "-o", str(so)]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"linking failed:\n{' '.join(link)}\n{r.stderr[-6000:]}")
    try:
        os.rename(out_dir, final)
    except OSError:  # another process finished first: use its build
        shutil.rmtree(out_dir, ignore_errors=True)
    if final.parent == cache:
        _prune(cache, keep=4)
    return target


def _prune(cache: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest builds in the cache."""
    builds = sorted(
        (d for d in cache.iterdir() if d.is_dir() and ".tmp" not in d.name),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for d in builds[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def load(path: Path):
    """Import the emulated ``_C`` from ``path`` under a private module name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastdiff_cuda_emu._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    print(build())
