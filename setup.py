"""Build driver: setuptools runs CMake (Ninja generator) to build the one extension, fastdiff._C.

Environment knobs (documented in README.md):
  FASTDIFF_CUDA=0|1        force the CUDA kernels off/on (default: on when CMake finds nvcc)
  FASTDIFF_CUDA_ARCHS      CMake CUDA architectures, default "80-real;90-real;90-virtual"
  MAX_JOBS                 parallel compile jobs (default: min(cores, 4), fits 2 cores / 24 GiB)
  FASTDIFF_BUILD_TYPE      Release (default) or Debug
An unrecognised value of any of them is an error before anything is built.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


_CUDA_VALUES = {"1": "ON", "ON": "ON", "TRUE": "ON", "YES": "ON", "0": "OFF", "OFF": "OFF",
                "FALSE": "OFF", "NO": "OFF", "AUTO": "AUTO", "": "AUTO"}  # fmt: skip
_ARCH = re.compile(r"(\d{2,3}[af]?(-real|-virtual)?|all|all-major|native)")
_BUILD_TYPES = ("Release", "Debug", "RelWithDebInfo", "MinSizeRel")
DEFAULT_ARCHS = "80-real;90-real;90-virtual"  # CMakeLists.txt's default too


def build_options(env: dict[str, str]) -> dict[str, str | None]:
    """The CMake settings that the environment variables ask for; ValueError naming the variable,
    what it accepts and what it got for anything else."""
    cuda = env.get("FASTDIFF_CUDA", "AUTO").strip().upper()
    if cuda not in _CUDA_VALUES:
        raise ValueError(
            f"FASTDIFF_CUDA={env['FASTDIFF_CUDA']!r}: expected 0 or 1 (or off/on, false/true, "
            "no/yes, auto)"
        )
    archs = env.get("FASTDIFF_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    if archs != DEFAULT_ARCHS:
        parts = [a for a in re.split(r"[;,\s]+", archs) if a]
        bad = [a for a in parts if not _ARCH.fullmatch(a)]
        if bad or not parts:
            raise ValueError(
                f"FASTDIFF_CUDA_ARCHS={archs!r}: expected CMake CUDA architectures separated by "
                f"';', e.g. '90-real' or '80-real;90-real;90-virtual' (sm_90 is 90-real), or "
                f"all / all-major / native; not understood: {bad}"
            )
        archs = ";".join(parts)
    jobs = env.get("MAX_JOBS", "").strip() or str(max(1, min(os.cpu_count() or 1, 4)))
    if not jobs.isdigit() or int(jobs) < 1:
        raise ValueError(f"MAX_JOBS={env['MAX_JOBS']!r}: expected a positive integer")
    build_type = env.get("FASTDIFF_BUILD_TYPE", "Release").strip()
    if build_type not in _BUILD_TYPES:
        raise ValueError(f"FASTDIFF_BUILD_TYPE={build_type!r}: expected one of {_BUILD_TYPES}")
    return {"cuda": _CUDA_VALUES[cuda], "archs": archs, "jobs": jobs, "build_type": build_type}


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        opts = build_options(dict(os.environ))
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        args = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={opts['build_type']}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTDIFF_CUDA={opts['cuda']}",
            # always passed: an earlier build's value must not linger in the CMake cache
            f"-DFASTDIFF_CUDA_ARCHS={opts['archs']}",
        ]
        ninja = shutil.which("ninja")
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        subprocess.run(args, cwd=build_dir, check=True)
        build = [cmake, "--build", ".", "--parallel", opts["jobs"]]
        subprocess.run(build, cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("fastdiff._C")],
    cmdclass={"build_ext": CMakeBuild},
)
