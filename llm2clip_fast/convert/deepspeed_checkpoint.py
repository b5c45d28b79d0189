"""DeepSpeed checkpoints of the official stage 2, read without running any code they pickle.

The official run trains with ``--enable-deepspeed --zero-stage=1 --precision fp16`` and saves with
``model.save_checkpoint(save_dir=.../checkpoints, tag="epoch_N", client_state={"epoch": N})``
(microsoft/LLM2CLIP ``llm2clip/training/main.py`` at commit cba3b45ba3d9). DeepSpeed (0.8.1, the version
``training/params.py`` asks for; ``runtime/engine.py`` ``_save_checkpoint``) writes
``checkpoints/epoch_N/mp_rank_00_model_states.pt``, a ``torch.save`` of::

    module          the model's state dict (fp16 tensors: CustomCLIP's visual.*, text.*, logit_scale)
    buffer_names, optimizer (None under ZeRO), param_shapes (OrderedDicts of torch.Size), lr_scheduler,
    data_sampler, random_ltd, sparse_tensor_module_names, skipped_steps, global_steps, global_samples,
    dp_world_size, mp_world_size, ds_config (a DeepSpeedConfig object), ds_version, epoch

and ``checkpoints/latest`` holding the last tag. ``ds_config`` is an instance of DeepSpeed's classes
(with nested config objects and enums), which ``torch.load(weights_only=True)`` refuses and a plain
``torch.load`` would rebuild by calling DeepSpeed's code (or whatever a crafted file names instead).
:func:`load_deepspeed_model_states` reads the file with ``weights_only=True`` after registering, for
every class or function the pickle names outside torch's own allow-list, an inert stand-in
(:class:`Opaque`, which only stores what it is given): nothing the file names is imported or called,
and the ``module`` tensors come back as torch rebuilds them.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"
_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|global) ([\w.]+)")


class Opaque:
    """An inert stand-in for a class or function named by a checkpoint's non-tensor entries: whatever
    the pickle passes it is kept (``args``, ``state``), nothing else happens."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"Opaque(args={self.args!r})"


def model_states_file(path: str | os.PathLike) -> Path:
    """The ``mp_rank_00_model_states.pt`` that ``path`` names: the file itself, an ``epoch_N`` tag folder,
    or the checkpoints folder (its ``latest`` tag)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if (p / MODEL_STATES).is_file():
        return p / MODEL_STATES
    latest = p / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if (p / tag / MODEL_STATES).is_file():
            return p / tag / MODEL_STATES
    raise FileNotFoundError(f"{path}: no DeepSpeed {MODEL_STATES} there (give the file, its epoch_N folder "
                            "or the checkpoints folder with its 'latest' file)")


def pickled_globals(path: str | os.PathLike) -> set[str]:
    """The ``module.name`` globals the pickle of a ``torch.save`` zip file refers to (read, not run)."""
    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if name is None:
            raise ValueError(f"{path}: not a torch.save zip archive (no data.pkl)")
        data = archive.read(name)
    found: set[str] = set()
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = strings[-1] if strings else None
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            strings.append(memo.get(int(arg)))
        elif op.name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            found.add(f"{module}.{attr}")
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            module, attr = strings[-2], strings[-1]
            if isinstance(module, str) and isinstance(attr, str):
                found.add(f"{module}.{attr}")
    return found


def _allowed_by_torch(name: str) -> bool:
    from torch._weights_only_unpickler import _get_allowed_globals

    return name in _get_allowed_globals()


def load_deepspeed_model_states(path: str | os.PathLike) -> dict[str, Any]:
    """The whole ``mp_rank_00_model_states.pt`` dict of ``path`` (see :func:`model_states_file`), read
    with ``torch.load(weights_only=True)``; DeepSpeed's objects come back as :class:`Opaque`."""
    file = model_states_file(path)
    names = {n for n in pickled_globals(file) if not _allowed_by_torch(n)}
    for _ in range(64):  # a name the scan missed (an unusual opcode) is added when torch names it
        try:
            with torch.serialization.safe_globals([(Opaque, n) for n in sorted(names)]):
                state = torch.load(str(file), map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as exc:
            missing = _UNSUPPORTED.search(str(exc))
            if missing is None or missing.group(1) in names:
                # torch's own reason, without its advice to load with weights_only=False
                reason = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line),
                              str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                raise ValueError(f"{file} cannot be read as a DeepSpeed checkpoint without running its code "
                                 f"(refused, nothing of it ran): {reason}") from None
            names.add(missing.group(1))
    else:
        raise ValueError(f"{file}: too many pickled globals to stand in for")
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"{file} is not a DeepSpeed model-states file: it holds no 'module' state dict "
                         f"(keys: {sorted(state)[:10] if isinstance(state, dict) else type(state).__name__})")
    return state


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a DeepSpeed model-states file, tag folder or checkpoints folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.name.endswith("_model_states.pt")
    return (p / MODEL_STATES).is_file() or (p / "latest").is_file()
