"""setup.py's build options: LLM2CLIP_CUDA_ARCHS parsing and when LLM2CLIP_SKIP_CUDA / a missing nvcc
leave out the CUDA module, checked on setup.py itself (imported, not run: no build happens)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def setup_py():
    path = Path(__file__).resolve().parents[2] / "setup.py"
    spec = importlib.util.spec_from_file_location("llm2clip_fast_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not called
    return module


@pytest.mark.parametrize("raw,want", [
    ("80;90", ["80", "90"]),
    ("8.0, 9.0", ["80", "90"]),
    (" 90 ;", ["90"]),
    ("75,80;86", ["75", "80", "86"]),
])
def test_cuda_archs_parsing(setup_py, raw, want):
    assert setup_py.cuda_archs(raw) == want


@pytest.mark.parametrize("raw", ["", " ; ", "sm_90", "80;hopper"])
def test_cuda_archs_rejects_bad_values(setup_py, raw):
    with pytest.raises(ValueError, match="LLM2CLIP_CUDA_ARCHS"):
        setup_py.cuda_archs(raw)


def test_cuda_archs_reads_the_environment_with_80_90_default(setup_py, monkeypatch):
    monkeypatch.delenv("LLM2CLIP_CUDA_ARCHS", raising=False)
    assert setup_py.cuda_archs() == ["80", "90"]
    monkeypatch.setenv("LLM2CLIP_CUDA_ARCHS", "9.0")
    assert setup_py.cuda_archs() == ["90"]


@pytest.mark.parametrize("skip,nvcc,build", [
    ("1", "/usr/local/cuda/bin/nvcc", False),
    ("true", "/usr/local/cuda/bin/nvcc", False),
    ("ON", None, False),
    ("0", "/usr/local/cuda/bin/nvcc", True),
    (None, "/usr/local/cuda/bin/nvcc", True),
    ("", None, False),
])
def test_cuda_build_decision(setup_py, skip, nvcc, build):
    got, why = setup_py.cuda_build_decision(skip, nvcc)
    assert got is build
    if not build:
        assert ("LLM2CLIP_SKIP_CUDA is set" if skip and skip != "0" else "nvcc not found") in why


def test_native_extensions_follow_the_environment(setup_py, monkeypatch, capsys):
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setenv("LLM2CLIP_SKIP_CUDA", "1")
    assert [e.name for e in setup_py.native_extensions()] == ["llm2clip_fast._C"]
    assert "LLM2CLIP_SKIP_CUDA is set" in capsys.readouterr().out
    monkeypatch.delenv("LLM2CLIP_SKIP_CUDA")
    exts = setup_py.native_extensions()
    assert [e.name for e in exts] == ["llm2clip_fast._C", "llm2clip_fast._cuda"]
    assert exts[1].sources and all(s.startswith("csrc/cuda/") for s in exts[1].sources)
    monkeypatch.setattr(setup_py, "find_nvcc", lambda: None)
    with pytest.warns(UserWarning, match="nvcc not found"):
        assert [e.name for e in setup_py.native_extensions()] == ["llm2clip_fast._C"]


@pytest.mark.parametrize("raw,want", [("4", 4), (" 16 ", 16), ("1", 1)])
def test_build_jobs_reads_max_jobs(setup_py, raw, want):
    assert setup_py.build_jobs(raw) == want


def test_build_jobs_defaults_to_the_cpu_count(setup_py, monkeypatch):
    monkeypatch.delenv("MAX_JOBS", raising=False)
    assert setup_py.build_jobs() >= 1
    assert setup_py.build_jobs("") == setup_py.build_jobs()


@pytest.mark.parametrize("raw", ["0", "-2", "four", "2.5"])
def test_build_jobs_rejects_bad_values(setup_py, raw):
    with pytest.raises(ValueError, match="MAX_JOBS"):
        setup_py.build_jobs(raw)

