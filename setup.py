"""Build videor1 (the trainer), kernels (the standalone Triton GRPO kernels) and videor1._C.

videor1._C is compiled from csrc/: the C++ sources always, the CUDA sources when torch was built
with CUDA and nvcc is found. Switches (as flash-attention's):
  VIDEOR1_FORCE_CUDA_BUILD=1  build the CUDA sources or fail (CI uses this, so a broken .cu fails CI)
  VIDEOR1_SKIP_CUDA_BUILD=1   never build the CUDA sources (CPU-only wheel)
  VIDEOR1_CUDA_ARCHS="80;90"  gencodes (default sm_80 and sm_90)
  MAX_JOBS                    parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

# Default CUDA_HOME is /usr/local/cuda (torch would otherwise guess from the nvcc on PATH and can
# pick a prefix without the CUDA libraries, e.g. /usr/local when nvcc is /usr/local/bin/nvcc).
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _nvcc() -> str | None:
    home = CUDA_HOME or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def _want_cuda() -> bool:
    force, skip = _flag("VIDEOR1_FORCE_CUDA_BUILD"), _flag("VIDEOR1_SKIP_CUDA_BUILD")
    if force and skip:
        sys.exit("setup.py: VIDEOR1_FORCE_CUDA_BUILD and VIDEOR1_SKIP_CUDA_BUILD are both set")
    if skip:
        return False
    possible = torch.version.cuda is not None and _nvcc() is not None
    if force and not possible:
        sys.exit(
            "setup.py: VIDEOR1_FORCE_CUDA_BUILD=1 but the CUDA build is impossible: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc={_nvcc()!r} (CUDA_HOME={CUDA_HOME!r})"
        )
    return possible


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc")]
    # torch sets the C++ standard (C++20 for 2.14). -fopenmp: at::parallel_for is an inline OpenMP
    # region compiled into our code, serial without it; linking -fopenmp binds to the libgomp.so.1
    # torch has already loaded. No -march: the AVX2 kernels use target attributes and are picked at
    # run time, so the build stays portable.
    cxx = ["-O3", "-fopenmp"]
    ldflags = ["-fopenmp"]
    if not _want_cuda():
        print("setup.py: building videor1._C for CPU only", flush=True)
        return CppExtension(
            "videor1._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=ldflags
        )

    # torch's CUDA headers include cusparse.h etc., which the pip CUDA wheels ship under nvidia/cu13.
    for site in sys.path:
        cu_inc = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(cu_inc):
            include_dirs.append(cu_inc)
            break
    archs = os.environ.get("VIDEOR1_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    for arch in filter(None, (a.strip() for a in archs)):
        nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    print(f"setup.py: building videor1._C with CUDA (nvcc={_nvcc()}, archs={archs})", flush=True)
    return CUDAExtension(
        "videor1._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("VIDEOR1_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx + ["-DVIDEOR1_WITH_CUDA=1"], "nvcc": nvcc},
        extra_link_args=ldflags,
    )


setup(
    name="videor1",
    version="0.1.0",
    description="T-GRPO for video reasoning with fused Triton GRPO kernels and a fused frame-to-patch kernel",
    python_requires=">=3.11",
    packages=find_packages(include=["videor1", "videor1.*", "kernels", "kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    extras_require={"gpu": ["flash-attn"]},
)
