"""Build llm2clip_fast and its native extensions.

- ``llm2clip_fast._C``: C++ CPU ops (torch C++ API + OpenMP), built by torch's cpp_extension. Always built.
- ``llm2clip_fast._cuda``: raw CUDA kernels + pybind11, no torch headers, cudart linked statically.
  Built whenever ``nvcc`` is found; a missing or failing nvcc is a warning, never a failed install.

Environment:
- ``LLM2CLIP_CUDA_ARCHS``: semicolon/comma separated compute capabilities for ``_cuda`` (default ``80;90``).
- ``LLM2CLIP_SKIP_CUDA=1``: do not build ``_cuda`` even if nvcc is present.
- ``CUDA_HOME``: where to look for nvcc first (else ``PATH``, else ``/usr/local/cuda``).
- ``MAX_JOBS``: parallel compile jobs (default: the CPU count); with ninja, ``_C`` builds in parallel.

Build with ``pip install --no-build-isolation -e .`` so the build uses the torch you already have.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80;90"


def _truthy_value(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _truthy(name: str) -> bool:
    return _truthy_value(os.environ.get(name))


def find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def find_cuda_home(nvcc: str) -> Path:
    """The toolkit folder holding include/cuda_runtime_api.h (nvcc may be a wrapper script elsewhere)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    candidates += [Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")]
    for c in candidates:
        if (c / "include" / "cuda_runtime_api.h").is_file():
            return c
    raise FileNotFoundError(
        "no CUDA toolkit headers (include/cuda_runtime_api.h) under "
        f"{[str(c) for c in candidates]}; set CUDA_HOME"
    )


def cuda_archs(raw: str | None = None) -> list[str]:
    """Compute capabilities to build ``_cuda`` for, from ``raw`` (default: ``LLM2CLIP_CUDA_ARCHS``)."""
    if raw is None:
        raw = os.environ.get("LLM2CLIP_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
    archs = [a.strip().replace(".", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    bad = [a for a in archs if not a.isdigit()]
    if bad or not archs:
        raise ValueError(
            f"LLM2CLIP_CUDA_ARCHS={raw!r}: expected compute capabilities such as '80;90', "
            f"got {bad or 'nothing'}"
        )
    return archs


class NvccPybindExtension(Extension):
    """A pybind11 module: .cu sources go through nvcc, .cpp sources through the host compiler."""


class BuildNativeExtensions(BuildExtension):
    """torch's BuildExtension for ``_C``; a hand-driven nvcc + C++ build of ``_cuda`` that may fail softly."""

    def build_extensions(self) -> None:
        # torch's BuildExtension drives the C++ extension; the nvcc module is built afterwards and
        # only re-added to the extension list (whose outputs get installed) when it built.
        soft = [e for e in self.extensions if isinstance(e, NvccPybindExtension)]
        self.extensions = [e for e in self.extensions if not isinstance(e, NvccPybindExtension)]
        super().build_extensions()
        for ext in soft:
            try:
                self._build_nvcc_pybind(ext)
            except Exception as exc:
                warnings.warn(
                    f"llm2clip_fast: could not build {ext.name} ({exc}); CUDA kernels of that module will "
                    "be unavailable and other backends will serve. Set LLM2CLIP_SKIP_CUDA=1 to skip it.",
                    stacklevel=1,
                )
            else:
                self.extensions.append(ext)

    def build_extension(self, ext: Extension) -> None:
        if isinstance(ext, NvccPybindExtension):
            self._build_nvcc_pybind(ext)
            return
        super().build_extension(ext)

    def _build_nvcc_pybind(self, ext: NvccPybindExtension) -> None:
        import pybind11

        nvcc = find_nvcc()
        assert nvcc is not None  # checked before the extension was added
        cuda_home = find_cuda_home(nvcc)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.build_temp) / "cuda_objs"
        tmp.mkdir(parents=True, exist_ok=True)
        includes = [
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{cuda_home / 'include'}",
            f"-I{ROOT / 'csrc' / 'cuda'}",
        ]
        gencode = []
        for a in cuda_archs():
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        objects, commands = [], []
        for src in ext.sources:
            src_path = ROOT / src
            obj = tmp / (src_path.name + ".o")
            if src_path.suffix == ".cu":
                cmd = [nvcc, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
                       *gencode, *includes, str(src_path), "-o", str(obj)]
            else:
                cxx = host_compiler()
                cmd = [cxx, "-c", "-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", *includes,
                       str(src_path), "-o", str(obj)]
            print(" ".join(cmd), flush=True)
            commands.append(cmd)
            objects.append(str(obj))
        # Objects compile in parallel (MAX_JOBS, which torch's ninja build reads too).
        with ThreadPoolExecutor(max_workers=build_jobs()) as pool:
            for cmd, done in zip(commands, pool.map(lambda c: subprocess.run(c).returncode, commands)):
                if done != 0:
                    raise subprocess.CalledProcessError(done, cmd)
        cxx = host_compiler()
        # targets/<arch>-linux/lib: x86_64-linux, sbsa-linux (Arm servers), aarch64-linux (Jetson).
        lib_dirs = [cuda_home / "lib64", cuda_home / "lib", *sorted((cuda_home / "targets").glob("*/lib"))]
        link = [cxx, "-shared", "-o", str(out), *objects,
                *[f"-L{d}" for d in lib_dirs if d.is_dir()],
                "-lcudart_static", "-lrt", "-ldl", "-lpthread"]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)


def host_compiler() -> str:
    """The C++ compiler for ``_cuda``'s host files and link: ``CXX``, else Python's own, else ``c++``."""
    configured = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or ""
    return configured.split()[0] if configured.split() else "c++"


def build_jobs(raw: str | None = None) -> int:
    """Parallel compile jobs: ``MAX_JOBS`` if set (torch's ninja build reads the same), else the CPU count."""
    if raw is None:
        raw = os.environ.get("MAX_JOBS")
    if raw is None or not raw.strip():
        return max(1, os.cpu_count() or 1)
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"MAX_JOBS={raw!r}: expected a positive whole number of parallel compile jobs")
    return int(raw)


def cuda_build_decision(skip_env: str | None, nvcc: str | None) -> tuple[bool, str]:
    """Whether to build ``_cuda`` given ``LLM2CLIP_SKIP_CUDA``'s value and the nvcc found, and why not."""
    if _truthy_value(skip_env):
        return False, "llm2clip_fast: LLM2CLIP_SKIP_CUDA is set; not building llm2clip_fast._cuda"
    if nvcc is None:
        return False, ("llm2clip_fast: nvcc not found (looked in $CUDA_HOME/bin, PATH, "
                       "/usr/local/cuda/bin); llm2clip_fast._cuda will not be built. Triton, C++ CPU and "
                       "torch backends still work.")
    return True, ""


def native_extensions() -> list[Extension]:
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    exts: list[Extension] = [
        CppExtension(
            "llm2clip_fast._C",
            sources=cpu_sources,
            include_dirs=[str(ROOT / "csrc" / "cpu")],
            extra_compile_args=["-O3", *openmp],
            extra_link_args=openmp,
        )
    ]
    skipped = _truthy("LLM2CLIP_SKIP_CUDA")
    build, why = cuda_build_decision(os.environ.get("LLM2CLIP_SKIP_CUDA"), None if skipped else find_nvcc())
    if not build and skipped:
        print(why, flush=True)
    elif not build:
        warnings.warn(why, stacklevel=1)
    else:
        cuda_sources = sorted(
            str(p.relative_to(ROOT))
            for p in [*(ROOT / "csrc" / "cuda").glob("*.cu"), *(ROOT / "csrc" / "cuda").glob("*.cpp")]
        )
        exts.append(NvccPybindExtension("llm2clip_fast._cuda", sources=cuda_sources))
    return exts


# Guarded so tests can import this file for cuda_archs / cuda_build_decision; pip's build backend and
# `python setup.py ...` both run it as __main__.
if __name__ == "__main__":
    setup(
        packages=[
            "llm2clip_fast",
            "llm2clip_fast.ops",
            "llm2clip_fast.models",
            "llm2clip_fast.data",
            "llm2clip_fast.convert",
            "llm2clip_fast.train",
            "llm2clip_fast.train.cli",
            "llm2clip_fast.eval",
            "llm2clip_fast.eval.suites",
            # Not code: the ImageNet class names and OpenAI prompt templates the imagenet suite reads at
            # run time. Listed as a package (data only) so setuptools installs it without ambiguity.
            "llm2clip_fast.eval.suites.data",
            "llm2clip_fast.kernels",
        ],
        package_data={"llm2clip_fast.eval.suites.data": ["*.txt", "*.md"]},
        # The Triton kernels live in llm2clip_kernels/, not kernels/: a top-level kernels/ folder is
        # importable as `kernels` whenever Python runs from the repository root (python -m ...), and
        # bitsandbytes imports the PyPI package of that name, printing a load failure on every run.
        package_dir={"llm2clip_fast": "llm2clip_fast", "llm2clip_fast.kernels": "llm2clip_kernels"},
        ext_modules=native_extensions(),
        # ninja compiles _C's sources in parallel (MAX_JOBS); without ninja torch warns and builds them
        # one by one. scripts/bootstrap.sh installs it.
        cmdclass={"build_ext": BuildNativeExtensions.with_options(use_ninja=True)},
        zip_safe=False,
    )
