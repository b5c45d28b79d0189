"""Every bench/ script and the GPU check run in --quick mode, so none of them rots.

Each script runs in a fresh process, as a user would start it, with a temporary output; the test
checks the exit status, the JSON it wrote, that every point succeeded, and that every row of a fused
implementation names the backend the op actually ran on. These run in the default `pytest -q`: each
quick run is a few tiny points (seconds on an idle 2-core machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import gpu_check  # noqa: E402

BACKENDS = {"triton", "cpu", "torch", "cuda", "reference", "lean"}

# (id, script and extra args, row key naming the implementation, fused values, key of the recorded backend
# or None for a bench that runs no op)
BENCHES = [
    ("loss_throughput", ["bench/loss_throughput.py"], "provider", {"fused"}, "backend"),
    ("adapter_throughput", ["bench/adapter_throughput.py"], "impl", {"lean"}, "backend"),
    ("distributed_memory", ["bench/distributed_memory.py"], "provider", {"global-clip"}, "backend"),
    ("embed_throughput", ["bench/embed_throughput.py"], None, None, "pool_backend"),
    ("stage2_throughput", ["bench/stage2_throughput.py"], "impl", {"fused"}, "loss_backend"),
    ("train_throughput", ["bench/train_throughput.py"], "loss", {"fused"}, "loss_backend"),
    # Reads the embedding cache with numpy: no op, so no backend to record.
    ("cache_throughput", ["bench/cache_throughput.py"], None, None, None),
    # Image decoding: no op either; the GPU decode row says why it is unavailable on CPU.
    ("loader_throughput", ["bench/loader_throughput.py"], None, None, None),
]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = str(threads)
    return env


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every quick run, as many at a time as there are cores (each one single-threaded).

    Most of a quick run is process start-up (importing torch), which parallelises well; running
    them side by side keeps the module's wall time near the longest run instead of the sum.
    """
    root = tmp_path_factory.mktemp("bench_quick")
    jobs = {"gpu_check": ["bench/gpu_check.py", "--quick", "--out", str(root / "gpu_check")]}
    for name, cmd, *_ in BENCHES:
        jobs[name] = [*cmd, "--quick", "--out", str(root / f"{name}.json")]
    slots = max(1, min(len(jobs), os.cpu_count() or 1))
    pending = list(jobs.items())  # gpu_check first: the longest
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}
    logs: dict[str, Any] = {}
    while pending or running:
        while pending and len(running) < slots:
            name, args = pending.pop(0)
            logs[name] = open(root / f"{name}.log", "w+")  # closed once the run ends
            proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(1), stdout=logs[name],
                                    stderr=subprocess.STDOUT, text=True)
            running[name] = (proc, time.monotonic())
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started > 900:
                proc.kill()
            if proc.poll() is not None:
                proc.wait()
                logs[name].seek(0)
                out = logs[name].read()
                logs[name].close()
                result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
                done[name] = (result, root / name if name == "gpu_check" else root / f"{name}.json")
                del running[name]
        time.sleep(0.2)
    return done


def _load_rows(out: Path, proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert out.exists(), f"no JSON written at {out}\n{proc.stdout[-2000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert rows, "the quick run measured nothing"
    # A path or provider that cannot run here (a CUDA-only peer or decoder on CPU) is a row that says why.
    said_why = [r for r in rows
                if r.get("status") in ("skipped", "unavailable") and (r.get("reason") or r.get("error"))]
    bad = [r for r in rows if r.get("status") != "ok" and r not in said_why]
    assert not bad, bad
    return [r for r in rows if r.get("status") == "ok"]


@pytest.mark.parametrize("name,cmd,impl_key,fused,backend_key", BENCHES, ids=[b[0] for b in BENCHES])
def test_bench_quick_runs_and_records_backends(quick_runs, name, cmd, impl_key, fused, backend_key):
    proc, out = quick_runs[name]
    rows = _load_rows(out, proc)
    for row in rows:
        if backend_key is not None and (impl_key is None or row[impl_key] in fused):
            assert row.get(backend_key) in BACKENDS, (backend_key, row)


def test_gpu_check_quick_passes_every_stage(quick_runs):
    proc, out = quick_runs["gpu_check"]
    assert proc.returncode == 0, proc.stdout[-4000:]
    summary = (out / "summary.md").read_text()
    for stage in gpu_check.STAGES:
        doc = json.loads((out / f"{stage.name}.json").read_text())
        assert doc["schema"] == gpu_check.SCHEMA and doc["stage"] == stage.name
        assert doc["status"] == "ok", (stage.name, doc.get("error"), doc["results"])
        assert doc["results"], stage.name
        assert f"| {stage.name} | **ok** |" in summary
    correctness = json.loads((out / "correctness.json").read_text())["results"]
    ran = [r for r in correctness if r["status"] == "ok"]
    # Forced Triton under the interpreter: the kernels themselves were checked, nothing fell back.
    assert sum(r["metrics"].get("backend") == "triton" for r in ran) >= 7, ran


def test_gpu_check_stage_cut_short_is_reported_as_timeout(tmp_path):
    env_stage = next(s for s in gpu_check.STAGES if s.name == "env")
    doc = gpu_check.launch_stage(env_stage, tmp_path, quick=True, timeout_s=0.3)
    assert doc["status"] == "timeout"
    assert json.loads((tmp_path / "env.json").read_text())["status"] == "timeout"
    text = gpu_check.render_summary([doc], quick=True)
    assert "| env | **timeout** |" in text


def test_gpu_check_says_what_to_do_without_the_package(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llm2clip_fast.kernels", None)
    assert gpu_check.main(["--out", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and gpu_check.INSTALL in err[0], err


def test_per_test_time_limit_plugin_fails_a_slow_test(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n")
    env = dict(os.environ, LLM2CLIP_TEST_TIME_LIMIT_S="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "bench._pytest_time_limit",
                           "-p", "no:cacheprovider", str(tmp_path / "test_slow.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "ran past the 1 s per-test limit" in proc.stdout


def test_loss_bench_cuda_defaults_are_bounded(monkeypatch):
    from bench import loss_throughput as L

    assert L._default_sweep("cuda", quick=False) == ([8192, 65536, 1 << 20], [1024], "bf16")
    every = list(L.PROVIDERS["clip"])
    for b in (8192, 65536):  # every contender; the pure-torch backend only on request
        assert L.default_providers_at("cuda", b, every, quick=False) == [
            "fused", "fused-recompute", "materialised", "materialised-compiled", "materialised-1gemm",
            "materialised-1gemm-compiled", "inf-cl"]
    assert L.default_providers_at("cuda", 1 << 20, every, quick=False) == ["fused"]
    assert L.default_providers_at("cuda", 8192, list(L.PROVIDERS["siglip"]), quick=False) == [
        "fused", "materialised", "materialised-compiled", "siglip-kernel"]
    # Children share Triton's on-disk autotune cache, so a shape is tuned once, not in every process.
    seen = {}
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    monkeypatch.setattr(L, "run_point_in_subprocess",
                        lambda target, kwargs, timeout_s, env: seen.update(env) or {"status": "ok"})
    L.run_point("clip", "fused", 8, 4, "cuda", "bf16", 0.1)
    assert seen == {"TRITON_CACHE_AUTOTUNING": "1"}


def test_loss_bench_peers_skip_with_their_reason_and_count_what_they_execute():
    from bench import loss_throughput as L

    peers = (("clip", "inf-cl", "20*B^2*D"), ("siglip", "siglip-kernel", "6*B^2*D"))
    for loss, provider, convention in peers:
        row = L.point(loss, provider, 8, 32, "cpu", "fp32", 0.01, error_batch=0)
        assert row["status"] == "skipped" and "CUDA tensors only" in row["reason"], row
        assert row["flops_counted"] == convention
    assert L.PROVIDERS["clip"]["materialised"].factor == 12  # OpenCLIP as written: two logit GEMMs
    assert L.PROVIDERS["clip"]["materialised-1gemm-compiled"].factor == 6
    assert [L._inf_cl_head_dim(d) for d in (1024, 512, 48, 24)] == [256, 256, 16, None]
    assert L._fused_factor("keep-logits", 8.0) == 6.0 and L._fused_factor("recompute", 8.0) == 8.0


def test_loss_bench_float64_errors_and_cpu_target():
    from bench import loss_throughput as L

    img, txt = L.make_inputs(24, 16, torch.device("cpu"), torch.float32)
    errors = L.float64_errors("clip", L.PROVIDERS["clip"]["fused"].build(24, 16, "cpu"), img, txt)
    assert set(errors) == {"loss_err", "d_image_err", "d_text_err", "d_scale_err"}
    assert max(errors.values()) < 1e-5, errors
    rows = [{"provider": p, "B": b, "D": 512, "dtype": "fp32", "status": "ok", "median_ms": ms, "path": path,
             "peak_above_baseline_mb": mb}
            for p, b, ms, path, mb in (("fused", 8192, 900.0, "keep-logits", 300.0),
                                       ("materialised-1gemm-compiled", 8192, 1000.0, None, 520.0),
                                       ("fused-recompute", 32768, 9e4, "recompute", 200.0))]
    target = L.cpu_target(rows)
    assert target["speed_vs_plain_compiled"] == pytest.approx(1000 / 900) and target["speed_ok"]
    assert target["big_memory_over_inputs"] == pytest.approx(200 / 128)


def test_loss_bench_interleaved_runs_every_provider_in_turn():
    from bench import loss_throughput as L

    res = L.interleaved("clip", ["fused", "materialised-1gemm"], 16, 8, "cpu", "fp32", rounds=2)["providers"]
    assert set(res) == {"fused", "materialised-1gemm"}
    assert all(len(r["times_ms"]) == 2 and r["min_ms"] <= r["median_ms"] for r in res.values())
    assert res["fused"]["path"] == "keep-logits" and res["materialised-1gemm"]["path"] is None
