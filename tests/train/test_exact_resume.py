"""Kill + resume of stage 2 is bit-identical to the uninterrupted run (losses and final weights) in
every mode the trainer offers: adapter dropout, DataLoader workers, gradient accumulation, SigLIP,
random captions, the CLIP-style baseline text tower. Most combinations stop in-process (an exception
inside step 6, after the step-4 checkpoint); one test kills a real subprocess with SIGKILL in the
middle of writing a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _stage2_runs import final_state, logged_losses, make_demo, stage2_args, stop_stage2_in_step

from llm2clip_fast.train.__main__ import main as train_main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("exact_resume"))


def _assert_identical(full: Path, resumed: Path) -> None:
    assert logged_losses(resumed) == logged_losses(full)
    a, b = final_state(full), final_state(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


COMBOS = {
    "dropout": ("--adapter-dropout", "0.1"),
    "dropout-accum": ("--adapter-dropout", "0.1", "--grad-accum", "2", "--batch-size", "4"),
    "dropout-siglip": ("--adapter-dropout", "0.1", "--loss", "siglip"),
    "dropout-random-caption": ("--adapter-dropout", "0.1", "--caption", "random"),
    "dropout-workers": ("--adapter-dropout", "0.1", "--num-workers", "2"),
    "clip-text-tower": ("--text-tower", "clip", "--clip-text-width", "16", "--clip-text-layers", "1",
                        "--clip-text-heads", "2", "--caption", "random"),
}


def _argv(demo, out, *args, steps):
    argv = stage2_args(demo, out, *args, steps=steps)
    if "clip" in args:  # the baseline text tower trains on raw captions: no embedding cache
        i = argv.index("--embeddings")
        del argv[i:i + 2]
    return argv


@pytest.mark.parametrize("combo", list(COMBOS))
def test_stop_and_resume_is_bit_identical(demo, tmp_path, monkeypatch, combo):
    args = ("--save-every", "2", *COMBOS[combo])
    assert train_main(_argv(demo, tmp_path / "full", *args, steps=6)) == 0

    stop_stage2_in_step(monkeypatch, _argv(demo, tmp_path / "stopped", *args, steps=6), 6)
    assert train_main(_argv(demo, tmp_path / "stopped", *args, "--resume", steps=6)) == 0
    _assert_identical(tmp_path / "full", tmp_path / "stopped")


# Runs stage 2 in a child; while it writes the step-6 checkpoint's state file it announces itself and
# waits, so the parent's SIGKILL lands mid-save (leaving a .tmp- folder behind), after step 4's checkpoint.
_CHILD = r"""
import sys, time
from pathlib import Path
from llm2clip_fast.train import checkpoint
real_save_file = checkpoint.save_file

def save_file(tensors, filename, *a, **k):
    real_save_file(tensors, filename, *a, **k)
    if ".tmp-step_00000006" in filename and filename.endswith("trainer_state.safetensors"):
        Path(sys.argv[1]).write_text("saving")
        time.sleep(600)

checkpoint.save_file = save_file
from llm2clip_fast.train.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_save_then_resume_is_bit_identical(demo, tmp_path):
    args = ("--save-every", "2", "--adapter-dropout", "0.1", "--caption", "random")
    assert train_main(stage2_args(demo, tmp_path / "full", *args, steps=8)) == 0

    killed, marker = tmp_path / "killed", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker),
                              *stage2_args(demo, killed, *args, steps=8)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the step-6 checkpoint"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()
    leftovers = [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the kill should have interrupted the step-6 save"
    assert not (killed / "checkpoints" / "step_00000006").exists()

    assert train_main(stage2_args(demo, killed, *args, "--resume", steps=8)) == 0
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    _assert_identical(tmp_path / "full", killed)
