"""Which backend automatic dispatch picks for every op, device and dtype here; `info` says the same;
an availability check that raises is reported (once) instead of silently turning into a fallback;
under CI the native CPU extension must be built."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from llm2clip_fast import info
from llm2clip_fast._extensions import cpu_extension
from llm2clip_fast.ops import _backend
from llm2clip_fast.ops._backend import Backend

F32, F64, F16, BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
# CPU tensors, no forcing. Triton (interpreter) and the reference serve only when forced; the C++
# extension takes what its kernels implement; plain torch takes the rest.
EXPECTED_CPU = {
    "clip_loss": {F32: "cpu", F64: "cpu", F16: "torch", BF16: "cpu"},
    "siglip_loss": {F32: "cpu", F64: "cpu", F16: "cpu", BF16: "cpu"},
    "masked_mean_pool": {F32: "cpu", F64: "torch", F16: "cpu", BF16: "cpu"},
    "text_adapter": {F32: "lean", F64: "torch", F16: "torch", BF16: "lean"},
    "w8a8_linear": {F32: "cpu", F64: "torch", F16: "torch", BF16: "cpu"},
}


def _expected_cpu(op: str, dtype: torch.dtype) -> str:
    want = EXPECTED_CPU[op][dtype]
    # Without the extension (a user's failed build; never CI, see below) plain torch takes over.
    return "torch" if want in ("cpu", "lean") and cpu_extension() is None else want


def test_every_registered_op_has_an_expected_row():
    assert sorted(info.load_all_ops()) == sorted(EXPECTED_CPU)


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=str)
@pytest.mark.parametrize("op_name", sorted(EXPECTED_CPU))
def test_automatic_dispatch_on_cpu(op_name, dtype, monkeypatch):
    for var in [v for v in os.environ if v.startswith("LLM2CLIP_BACKEND")]:
        monkeypatch.delenv(var)
    op = info.load_all_ops()[op_name]
    tensors = op.probe(torch.device("cpu"), dtype)
    assert _backend.select_backend(op_name, tensors).name == _expected_cpu(op_name, dtype)


def test_info_reports_the_dispatch_of_each_op(monkeypatch, capsys):
    for var in [v for v in os.environ if v.startswith("LLM2CLIP_BACKEND")]:
        monkeypatch.delenv(var)
    data = info.collect()
    rows = {(r["op"], r["dtype"]): r for r in data["ops"] if r["device"] == "cpu"}
    assert sorted(rows) == sorted((op, d) for op in EXPECTED_CPU for d in ("float32", "bfloat16"))
    for (op, dtype_name), row in rows.items():
        want = _expected_cpu(op, getattr(torch, dtype_name))
        assert row["serves"] == want and row["forced_by_env"] is None
        # Every backend ahead of the chosen one says why it was passed over.
        names = info.load_all_ops()[op].backend_names()
        assert set(names[: names.index(want)]) <= set(row["refusals"]), (op, dtype_name)
        assert want not in row["refusals"]
    assert info.main([]) == 0
    text = capsys.readouterr().out
    for (op, dtype_name), row in rows.items():
        assert f"  {op:<18} cpu   {dtype_name:<9} -> {row['serves']}\n" in text
    assert "triton     not used: the Triton interpreter runs CPU tensors only when forced" in text


def test_env_forcing_is_shown_by_info(monkeypatch):
    monkeypatch.setenv("LLM2CLIP_BACKEND_CLIP_LOSS", "torch")
    rows = [r for r in info.collect()["ops"] if r["op"] == "clip_loss"]
    assert rows and all(r["forced_by_env"] == "torch" for r in rows)
    assert "[env forces torch]" in info.render(info.collect())


@pytest.fixture()
def op_with_a_crashing_check():
    def crashing(ctx):
        raise ZeroDivisionError("probe divided by zero")

    _backend.register_op("crash_op", [Backend("fast", run=lambda: "fast", reasons=crashing),
                                      Backend("slow", run=lambda: "slow", reasons=lambda ctx: [])])
    yield
    _backend._REGISTRY.pop("crash_op", None)
    _backend._REPORTED_CHECK_FAILURES.clear()


def test_a_raising_availability_check_falls_back_and_is_logged_once(op_with_a_crashing_check, caplog):
    x = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.ops._backend"):
        for _ in range(3):
            assert _backend.select_backend("crash_op", [x]).name == "slow"
    records = [r for r in caplog.records if r.name == "llm2clip_fast.ops._backend"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "backend 'fast'" in message and "ZeroDivisionError: probe divided by zero" in message
    assert "falls back" in message
    assert dict(_backend.explain("crash_op", [x]))["fast"] == [
        "availability check failed: ZeroDivisionError: probe divided by zero"]
    # Forced, the same failure is an error naming it, not a fallback.
    with pytest.raises(_backend.BackendUnavailableError, match="ZeroDivisionError: probe divided by zero"):
        _backend.select_backend("crash_op", [x], backend="fast")


def test_native_cpu_extension_is_built_under_ci():
    if os.environ.get("CI", "").strip().lower() not in ("1", "true", "yes"):
        pytest.skip("checked under CI only (CI=true): users may run without the native build")
    assert cpu_extension() is not None
    for name in ("clip_lse_forward", "clip_lse_backward", "siglip_loss_forward", "masked_mean_pool_forward"):
        assert hasattr(torch.ops.llm2clip_fast, name), name
