"""A forced backend that cannot serve raises with its reasons, and every op reports what it ran on.

Missing Triton kernel modules are simulated by putting ``None`` into ``sys.modules`` for
``llm2clip_fast.kernels.<name>``: the import then fails exactly as it does when the package is not
installed (no ``llm2clip_fast.kernels`` mapping).
"""

from __future__ import annotations

import sys

import pytest
import torch

from llm2clip_fast._extensions import cpu_extension
from llm2clip_fast.models.text_adapter import TextAdapter
from llm2clip_fast.ops import _availability, _backend
from llm2clip_fast.ops._backend import BackendUnavailableError, DispatchContext
from llm2clip_fast.ops.clip_loss import clip_loss
from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool
from llm2clip_fast.ops.siglip_loss import siglip_loss


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
