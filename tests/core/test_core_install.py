"""The core install (torch + numpy) serves every op and loss; the trainer names what it is missing.

The trainer's packages are hidden from a fresh interpreter by putting None in ``sys.modules`` for
them (an import then fails exactly as for a package that is not installed).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm2clip_fast.train.cli.dependencies import OPTIONAL_TRAIN_MODULES, TRAIN_MODULES

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = [*TRAIN_MODULES, *OPTIONAL_TRAIN_MODULES, "triton", "sentence_transformers", "accelerate",
          "pybind11"]


def _run_hidden(code: str, hide: list[str] = HIDDEN) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor _m in {hide!r}:\n    sys.modules[_m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_ops_and_losses_work_with_torch_alone():
    r = _run_hidden("""
        import torch, torch.nn.functional as F
        from llm2clip_fast.losses import ClipLoss, SigLipLoss
        from llm2clip_fast.models.text_adapter import TextAdapter
        from llm2clip_fast.ops.masked_mean_pool import masked_mean_pool
        from llm2clip_fast.ops.reference import clip_loss_reference
        from llm2clip_fast import info
        torch.manual_seed(0)
        img = F.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
        loss = ClipLoss()(img, txt, torch.tensor(10.0))
        ref = clip_loss_reference(img, txt, 10.0)
        assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
        loss.backward()
        s = SigLipLoss()(img.detach(), txt.detach(), torch.tensor(10.0), torch.tensor(-10.0))
        assert torch.isfinite(s)
        pooled = masked_mean_pool(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool))
        assert pooled.shape == (2, 8)
        adapter = TextAdapter(16, 4, num_blocks=1)
        adapter(torch.randn(3, 16, requires_grad=True)).sum().backward()
        info.collect()
        for name in ("transformers", "tqdm", "PIL", "safetensors", "triton"):
            assert sys.modules[name] is None, name  # hidden, and nothing swapped it in
        print("core ok")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "core ok" in r.stdout


@pytest.mark.parametrize("command", ["stage2", "embed", "pipeline"])
def test_trainer_without_its_packages_names_them_and_exits_9(command):
    r = _run_hidden(f"""
        from llm2clip_fast.train.__main__ import cli
        sys.exit(cli([{command!r}, "--help"]))
    """, hide=["transformers", "PIL"])
    assert r.returncode == 9, (r.returncode, r.stderr[-2000:])
    line = r.stderr.strip().splitlines()[0]
    assert "transformers, pillow" in line and "pip install 'llm2clip_fast[train]'" in line, line
    assert "Traceback" not in r.stderr


def test_pyproject_extras_match_the_dependency_check():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert core == {"torch", "numpy"}
    extras = project["optional-dependencies"]

    def names(extra: str) -> set[str]:
        out: set[str] = set()
        for req in extras[extra]:
            if req.startswith("llm2clip_fast["):
                for sub in req[len("llm2clip_fast["):-1].split(","):
                    out |= names(sub)
            else:
                out.add(req.split(">")[0].split("=")[0].strip())
        return out

    train = names("train")
    assert set(TRAIN_MODULES.values()) | set(OPTIONAL_TRAIN_MODULES.values()) <= train
    assert train <= names("all")
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(r.startswith("pybind11") for r in build)
    assert not any(d.startswith("pybind11") for d in project["dependencies"])


def test_loss_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    from llm2clip_fast.train.run_log import JsonlLog, plot_loss_curve

    path = tmp_path / "log.jsonl"
    with JsonlLog(path) as log:
        log.log({"step": 1, "loss": 1.0})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("WARNING"):
        assert plot_loss_curve(path, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    assert "matplotlib is not installed" in caplog.text
