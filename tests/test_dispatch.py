"""Dispatch: order, forcing by argument and environment, clear errors."""

from __future__ import annotations

import pytest
import torch

from llm2clip_fast.ops import _backend
from llm2clip_fast.ops._backend import Backend, BackendUnavailableError


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
