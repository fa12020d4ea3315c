"""Build driver: setuptools runs CMake (Ninja generator) to build the one extension, fastdiff._C.

Environment knobs (documented in README.md):
  FASTDIFF_CUDA=0|1        force the CUDA kernels off/on (default: on when CMake finds nvcc)
  FASTDIFF_CUDA_ARCHS      CMake CUDA architectures, default "80-real;90-real;90-virtual"
  MAX_JOBS                 parallel compile jobs (default: min(cores, 4), fits 2 cores / 24 GiB)
  FASTDIFF_BUILD_TYPE      Release (default) or Debug
"""

import os
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


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("FASTDIFF_CUDA", "AUTO").upper()
        if cuda in ("1", "ON", "TRUE", "YES"):
            cuda = "ON"
        elif cuda in ("0", "OFF", "FALSE", "NO"):
            cuda = "OFF"
        else:
            cuda = "AUTO"
        cmake = shutil.which("cmake") or "cmake"
        args = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FASTDIFF_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DFASTDIFF_CUDA={cuda}",
        ]
        archs = os.environ.get("FASTDIFF_CUDA_ARCHS")
        if archs:
            args.append(f"-DFASTDIFF_CUDA_ARCHS={archs}")
        ninja = shutil.which("ninja")
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        jobs = os.environ.get("MAX_JOBS") or str(max(1, min(os.cpu_count() or 1, 4)))
        subprocess.run(args, cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("fastdiff._C")],
    cmdclass={"build_ext": CMakeBuild},
)
