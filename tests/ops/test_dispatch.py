"""Backend dispatch, in three parts:

- the mechanism: order, forcing by argument and environment, clear errors (on a toy op);
- which backend automatic dispatch picks for every op, device and dtype here; `info` says the same; an
  availability check that raises is reported (once) instead of silently turning into a fallback; under CI
  the native CPU extension must be built;
- a forced backend that cannot serve raises with its reasons, and every op reports what it ran on.
  Missing Triton kernel modules are simulated by putting ``None`` into ``sys.modules`` for
  ``llm2clip_fast.kernels.<name>``: the import then fails exactly as it does when the package is not
  installed (no ``llm2clip_fast.kernels`` mapping).
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from llm2clip_fast import info
from llm2clip_fast._extensions import cpu_extension
from llm2clip_fast.models.text_adapter import TextAdapter
from llm2clip_fast.ops import _availability, _backend
from llm2clip_fast.ops._backend import Backend, BackendUnavailableError, DispatchContext
from llm2clip_fast.ops.clip_loss import clip_loss
from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool
from llm2clip_fast.ops.siglip_loss import siglip_loss

# ---- the dispatch mechanism --------------------------------------------------------------------------


@pytest.fixture()
def toy_op():
    refuse = Backend("fast", run=lambda: "fast", reasons=lambda ctx: ["needs a widget"])
    fine = Backend("slow", run=lambda: "slow", reasons=lambda ctx: [])
    forced_only = Backend(
        "exact", run=lambda: "exact", reasons=lambda ctx: [] if ctx.forced else ["only when forced"]
    )
    _backend.register_op("toy_op", [refuse, fine, forced_only])
    yield
    _backend._REGISTRY.pop("toy_op", None)


def test_first_backend_without_reasons_serves(toy_op):
    x = torch.zeros(2)
    assert _backend.select_backend("toy_op", [x]).name == "slow"
    rows = dict(_backend.explain("toy_op", [x]))
    assert rows["fast"] == ["needs a widget"] and rows["slow"] == []


def test_forcing_by_argument_and_env(toy_op, monkeypatch):
    x = torch.zeros(2)
    assert _backend.select_backend("toy_op", [x], backend="exact").name == "exact"
    monkeypatch.setenv("LLM2CLIP_BACKEND_TOY_OP", "exact")
    assert _backend.select_backend("toy_op", [x]).name == "exact"
    monkeypatch.delenv("LLM2CLIP_BACKEND_TOY_OP")
    monkeypatch.setenv("LLM2CLIP_BACKEND", "exact")
    assert _backend.select_backend("toy_op", [x]).name == "exact"


def test_forced_backend_that_cannot_serve_lists_reasons(toy_op, monkeypatch):
    x = torch.zeros(2)
    with pytest.raises(BackendUnavailableError, match="needs a widget"):
        _backend.select_backend("toy_op", [x], backend="fast")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        _backend.select_backend("toy_op", [x], backend="nope")


def test_global_env_naming_a_backend_this_op_lacks_is_ignored(toy_op, monkeypatch):
    monkeypatch.setenv("LLM2CLIP_BACKEND", "cuda")
    assert _backend.select_backend("toy_op", [torch.zeros(2)]).name == "slow"


def test_info_collects_versions_extensions_and_one_row_per_op_and_dtype():
    from llm2clip_fast import info
    from llm2clip_fast._extensions import cpu_extension

    data = info.collect()
    assert data["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    c_ext = data["extensions"]["llm2clip_fast._C"]
    assert c_ext["built"] is (cpu_extension() is not None)
    if c_ext["built"]:
        assert c_ext["omp_threads"] == cpu_extension().omp_max_threads() >= 1
    ops = sorted(name for name, op in info.load_all_ops().items() if op.probe is not None)
    assert ops  # every op module registered itself
    rows = [(r["op"], r["device"], r["dtype"]) for r in data["ops"]]
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    assert rows == [(op, dev, dt) for op in ops for dev in devices for dt in ("float32", "bfloat16")]
    assert all(r["serves"] is not None for r in data["ops"])  # torch serves everything at worst


def test_top_level_names_resolve_lazily():
    import llm2clip_fast

    for name in llm2clip_fast.__all__:
        assert getattr(llm2clip_fast, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llm2clip_fast.nope  # noqa: B018


# ---- what automatic dispatch picks here --------------------------------------------------------------


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


# ---- forced backends and what each op ran on ---------------------------------------------------------


@pytest.fixture
def fresh_probe():
    _availability.kernel_module_problem.cache_clear()
    _backend.clear_selections()
    yield
    _availability.kernel_module_problem.cache_clear()


def _adapter_call(backend):
    torch.manual_seed(0)
    model = TextAdapter(16, 8, num_blocks=1, backend=backend)
    return lambda: model(torch.randn(5, 16))


def _clip_call(backend):
    return lambda: clip_loss(torch.randn(5, 8), torch.randn(5, 8), 10.0, backend=backend)


def _siglip_call(backend):
    return lambda: siglip_loss(torch.randn(5, 8), torch.randn(5, 8), 10.0, -10.0, backend=backend)


def _pool_call(backend):
    return lambda: masked_mean_pool(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), backend=backend)


OPS = [
    ("text_adapter", "adapter", _adapter_call),
    ("clip_loss", "clip_loss", _clip_call),
    ("siglip_loss", "siglip_loss", _siglip_call),
    ("masked_mean_pool", "masked_mean_pool", _pool_call),
]


@pytest.mark.parametrize("op_name,module,make_call", OPS, ids=[o[0] for o in OPS])
def test_forced_triton_without_kernels_raises_with_the_import_error(
    op_name, module, make_call, fresh_probe, monkeypatch
):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the only reason left must be the missing module
    monkeypatch.setitem(sys.modules, f"llm2clip_fast.kernels.{module}", None)
    with pytest.raises(BackendUnavailableError) as err:
        make_call("triton")()
    msg = str(err.value)
    assert f"{op_name}: backend 'triton' was forced" in msg
    assert f"cannot import llm2clip_fast.kernels.{module} (ModuleNotFoundError" in msg
    assert _availability.INSTALL_HINT in msg
    assert _backend.last_selected(op_name) is None  # nothing ran


@pytest.mark.parametrize("op_name,module,make_call", OPS, ids=[o[0] for o in OPS])
def test_triton_reasons_name_the_missing_module_without_raising(
    op_name, module, make_call, fresh_probe, monkeypatch
):
    # The reason must come from the check itself, not from dispatch catching a crashed probe: a
    # crash would be logged as a broken check, and an automatic fallback would hide the cause.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, f"llm2clip_fast.kernels.{module}", None)
    op = _backend.registered_ops()[op_name]
    probe = op.probe(torch.device("cpu"), torch.float32)
    reasons = op.get("triton").reasons(DispatchContext(probe, forced=True))
    assert any(f"cannot import llm2clip_fast.kernels.{module}" in r for r in reasons), reasons


@pytest.mark.parametrize("op_name,module,make_call", OPS, ids=[o[0] for o in OPS])
def test_forced_triton_with_kernels_records_triton(op_name, module, make_call, fresh_probe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    make_call("triton")()
    assert _backend.last_selected(op_name) == "triton"


@pytest.mark.parametrize("op_name,module,make_call", OPS, ids=[o[0] for o in OPS])
def test_automatic_dispatch_on_cpu_records_what_ran(op_name, module, make_call, fresh_probe):
    make_call(None)()
    has_cpu_kernel = (op_name in ("clip_loss", "siglip_loss", "masked_mean_pool")
                      and cpu_extension() is not None)
    # The adapter's automatic CPU backend is "lean" (its element-wise work in _C's row kernels).
    cpu_backend = "lean" if op_name == "text_adapter" else "cpu"
    assert _backend.last_selected(op_name) == (cpu_backend if cpu_extension() is not None and (
        has_cpu_kernel or op_name == "text_adapter") else "torch")
    make_call("torch")()
    assert _backend.last_selected(op_name) == "torch"


def test_automatic_dispatch_on_cpu_does_not_import_kernels(fresh_probe, monkeypatch):
    # The kernel-module probe runs only once Triton could otherwise serve; on CPU tensors in
    # automatic mode it is never reached, so a blocked module changes nothing.
    monkeypatch.setitem(sys.modules, "llm2clip_fast.kernels.clip_loss", None)
    _clip_call(None)()
    assert _availability.kernel_module_problem.cache_info().currsize == 0
