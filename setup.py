"""Builds only the C++ CPU kernels (csrc/ -> hcrlhf._C); all metadata lives in pyproject.toml.

The extension is bound with pybind11 and exchanges data as numpy buffers, so it never needs
torch at build time. Set HCRLHF_SKIP_EXT=1 to skip it (then impl="cpp" raises a clear error).
"""

import glob
import os
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(compiler, flag: str) -> bool:
    """True when the C++ compiler builds a tiny OpenMP program with `flag`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            compile_args, link_args = ["/O2", "/openmp"], []
        else:
            compile_args, link_args = ["-O3"], []
            if _compiler_accepts(self.compiler, "-fopenmp"):
                compile_args.append("-fopenmp")
                link_args.append("-fopenmp")
            else:
                print("hcrlhf: OpenMP not found; the C++ kernels will run single-threaded", file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = [*ext.extra_compile_args, *compile_args]  # keeps pybind11's -std=c++17
            ext.extra_link_args = [*ext.extra_link_args, *link_args]
        super().build_extensions()


ext_modules = []
if os.environ.get("HCRLHF_SKIP_EXT", "0") not in ("1", "true", "yes"):
    from pybind11.setup_helpers import Pybind11Extension

    ext_modules.append(
        Pybind11Extension("hcrlhf._C", sorted(glob.glob("csrc/*.cpp")), cxx_std=17)
    )

# Package discovery lives here rather than in pyproject.toml because hcrlhf.benchmarks maps to the
# top-level benchmarks/ directory (see [tool.setuptools.package-dir]), which find cannot see.
setup(
    packages=[*find_packages(include=["hcrlhf", "hcrlhf.*"]), "hcrlhf.benchmarks"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
