"""Issue 30, item 1: one training loop for stage 1, its MNTP phase and stage 2, with the same rules.

- a non-finite loss or gradient stops the run *before* ``optimizer.step()`` with
  ``NonFiniteTrainingError`` (exit 8) naming the step: the weights never take that update, the
  schedule does not move, the last good checkpoint is kept;
- step 1 is always logged (then every ``--log-every`` and the last);
- ``--save-every 0``: no checkpoint before the last step; the final checkpoint and the final model are
  always saved.

First on a toy stage (a linear model, no files), then on the three real stages with tiny models.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from _stage2_runs import make_demo, stage2_args
from torch import nn

from llm2clip_fast.models.tiny_llm import build_tiny_llm
from llm2clip_fast.train import stage1, stage2
from llm2clip_fast.train.__main__ import cli
from llm2clip_fast.train.checkpoint import list_checkpoints
from llm2clip_fast.train.non_finite import NonFiniteTrainingError
from llm2clip_fast.train.run_log import read_jsonl
from llm2clip_fast.train.stop_requests import RunPreempted
from llm2clip_fast.train.training_loop import (
    LoopRules,
    MicroBatches,
    StepDone,
    StepWork,
    accumulate_separately,
    run_steps,
)

# -------------------------------------------------------------------------------------------------
# A toy stage: y = Wx on random data, the loss poisoned at one step when asked.


class ToySteps:
    name = "toy stage"

    def __init__(self, poison_step: int | None = None, poison: str = "loss", use: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(4, 2)
        self.out, self.device = "toy-run", torch.device("cpu")
        self.trainable = self.hand_synced = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))
        self.poison_step, self.poison, self.use = poison_step, poison, use
        self.drawn, self.steps, self.records, self.saved = 0, 0, [], []
        self.weights_after: dict[int, list[torch.Tensor]] = {0: self._weights()}
        self.gen = torch.Generator().manual_seed(1)

    def _weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def step_label(self, step: int) -> str:
        return f"step {step}"

    def collectives(self, step: int) -> str:
        return f"step {step}: none"

    def next_micro_batch(self):
        self.drawn += 1
        return torch.randn(3, 4, generator=self.gen), torch.randn(3, 2, generator=self.gen)

    def forward_backward(self, micro: MicroBatches) -> StepWork:
        step = self.steps + 1
        if self.use is not None:  # a stage that forgets micro-batches
            it = iter(micro)
            for _ in range(self.use):
                next(it)
            return StepWork(0.0, 0)

        def loss_of(mb):
            x, y = mb
            loss = ((self.model(x) - y) ** 2).mean()
            if step == self.poison_step:
                loss = loss * float("nan") if self.poison == "loss" else loss * 1e39 * 1e39
            return loss

        loss = accumulate_separately(micro, loss_of)
        if step == self.poison_step and self.poison == "gradient":
            loss = 1.0  # a finite loss whose gradient is not
        return StepWork(loss, 3 * len(micro))

    def after_update(self) -> None:
        pass

    def finished(self, done: StepDone) -> None:
        self.steps = done.step
        self.weights_after[done.step] = self._weights()

    def log_fields(self, done: StepDone) -> dict:
        return {"step": done.step, "loss": done.loss}

    def save_checkpoint(self, step: int) -> str:
        self.saved.append(step)
        return f"ckpt-{step}"

    def last_checkpoint(self):
        return f"ckpt-{self.saved[-1]}" if self.saved else None

    def before_final_checkpoint(self) -> None:
        pass

    def preempted(self, step, total, checkpoint):
        return RunPreempted(f"stopped after {step}")


class _Log:
    def __init__(self) -> None:
        self.records = []

    def log(self, record) -> None:
        self.records.append(record)


def _count_optimizer_steps(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def counted(self, *a, **k):
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    return calls


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_stops_before_the_update(poison, monkeypatch):
    calls = _count_optimizer_steps(monkeypatch)
    toy = ToySteps(poison_step=3, poison=poison)
    words = r"toy stage stopped at step 3: loss (nan|1\.0), gradient norm (nan|inf)"
    with pytest.raises(NonFiniteTrainingError, match=words) as err:
        run_steps(toy, LoopRules(total_steps=5, max_grad_norm=1.0, save_every=1), 0, _Log())
    assert "the last good checkpoint ckpt-2 is kept" in str(err.value)
    assert calls["n"] == 2 and toy.saved == [1, 2]
    # The weights are those after step 2: step 3 never reached them; the schedule did not move either.
    for now, before in zip(toy._weights(), toy.weights_after[2], strict=True):
        assert torch.equal(now, before)
    assert toy.scheduler.last_epoch == 2
    assert isinstance(err.value, FloatingPointError)  # exit code 8 on the command line


def test_step_1_every_log_every_and_the_last_step_are_logged():
    for log_every, want in [(10, [1, 10, 12]), (5, [1, 5, 10, 12]), (1, list(range(1, 13)))]:
        log = _Log()
        run_steps(ToySteps(), LoopRules(total_steps=12, log_every=log_every), 0, log)
        assert [r["step"] for r in log.records] == want, log_every
    log = _Log()
    run_steps(ToySteps(), LoopRules(total_steps=12, log_every=10), 10, log)  # resumed at step 10
    assert [r["step"] for r in log.records] == [12]


def test_save_every_0_saves_only_after_the_last_step():
    for save_every, want in [(0, [5]), (2, [2, 4, 5]), (5, [5]), (1, [1, 2, 3, 4, 5])]:
        toy = ToySteps()
        run_steps(toy, LoopRules(total_steps=5, save_every=save_every), 0)
        assert toy.saved == want, save_every


def test_each_step_draws_exactly_grad_accum_micro_batches():
    toy = ToySteps()
    run_steps(toy, LoopRules(total_steps=4, grad_accum=3), 0)
    assert toy.drawn == 12
    with pytest.raises(RuntimeError, match="used 2 of the step's 3 micro-batches"):
        run_steps(ToySteps(use=2), LoopRules(total_steps=1, grad_accum=3), 0)


def test_separate_accumulation_is_the_gradient_of_the_mean_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    chunks = [(torch.randn(3, 4), torch.randn(3, 2)) for _ in range(3)]
    loss = accumulate_separately(MicroBatches(iter(chunks).__next__, 3),
                                 lambda mb: ((model(mb[0]) - mb[1]) ** 2).mean())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x, y = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    whole = ((model(x) - y) ** 2).mean()
    whole.backward()
    assert loss == pytest.approx(float(whole), rel=1e-6)
    for g, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


# -------------------------------------------------------------------------------------------------
# The three stages


@pytest.fixture(autouse=True)
def _plain_errors(monkeypatch):
    monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("loop"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "llama", "llama", hidden_size=32, num_layers=1,
                          num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    rows = [{"key": f"t{i}", "short": f"a {c} shape", "long": f"a photo of a {c} shape on a white background"}
            for i, c in enumerate(["red", "green", "blue", "yellow", "purple", "orange"] * 4)]
    path = tmp_path_factory.mktemp("text") / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stage1_args(llm, data, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    return parser.parse_args(["--llm", str(llm), "--data", str(data), "--out", str(out), "--batch-size", "8",
                              "--eval-fraction", "0", "--quiet", "--max-length", "32", "--lr", "5e-3",
                              *extra])


def _poison_call(monkeypatch, module, name: str, call: int) -> None:
    real, calls = getattr(module, name), {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == call else loss

    monkeypatch.setattr(module, name, poisoned)


def test_stage2_non_finite_loss_stops_before_the_update_with_exit_8(demo, tmp_path, monkeypatch, capsys):
    calls = _count_optimizer_steps(monkeypatch)
    _poison_call(monkeypatch, stage2, "contrastive_loss", 3)
    out = tmp_path / "run"
    assert cli(stage2_args(demo, out, "--save-every", "1", steps=4)) == 8
    err = capsys.readouterr().err
    assert "stage 2 stopped at step 3: loss nan" in err and "step_00000002 is kept" in err
    assert calls["n"] == 2  # steps 1 and 2; step 3 never reached the weights
    assert [p.name for p in list_checkpoints(out)] == ["step_00000001", "step_00000002"]
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 2]
    assert not (out / "model").exists()


def test_stage2_logs_step_1_and_save_every_0_keeps_only_the_final_checkpoint(demo, tmp_path):
    out = tmp_path / "run"
    argv = stage2_args(demo, out, "--save-every", "0", "--log-every", "10", steps=3)  # the last wins
    assert cli(argv) == 0
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 3]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    assert (out / "model" / "config.json").is_file()


def test_stage1_non_finite_loss_stops_before_the_update(tiny, captions, tmp_path, monkeypatch):
    calls = _count_optimizer_steps(monkeypatch)
    _poison_call(monkeypatch, stage1, "contrastive_loss", 2)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match=r"stage 1 stopped at step 2 \(contrastive\): loss nan") \
            as err:
        stage1.train_stage1(_stage1_args(tiny, captions, out, "--steps", "3", "--save-every", "0"))
    assert "no checkpoint was saved yet" in str(err.value)
    assert calls["n"] == 1 and list_checkpoints(out) == [] and not (out / "merged").exists()


def test_stage1_logs_step_1_and_save_every_0_keeps_only_the_final_checkpoint(tiny, captions, tmp_path):
    out = tmp_path / "run"
    result = stage1.train_stage1(_stage1_args(tiny, captions, out, "--steps", "3", "--save-every", "0",
                                              "--log-every", "10"))
    assert result.steps == 3
    assert [r["step"] for r in read_jsonl(out / "log.jsonl")] == [1, 3]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003"]
    assert (out / "merged").is_dir() and (out / "adapter").is_dir()


def _passages(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("\n".join(f"the {c} shape is next to the {o} one" for c in ["red", "green", "blue", "tan"]
                              for o in ["red", "green", "blue", "tan"]) + "\n")
    return path


def test_mntp_phase_logs_step_1_and_stops_before_a_non_finite_update(tiny, captions, tmp_path, monkeypatch):
    from llm2clip_fast.train import mntp

    out = tmp_path / "run"
    argv = ("--mntp-data", str(_passages(tmp_path)), "--mntp-steps", "3", "--steps", "1", "--log-every", "10")
    stage1.train_stage1(_stage1_args(tiny, captions, out, *argv))
    log = read_jsonl(out / "mntp" / "log.jsonl")
    assert [(r["step"], r["phase"]) for r in log] == [(1, "mntp"), (3, "mntp")]

    calls = _count_optimizer_steps(monkeypatch)
    _poison_call(monkeypatch, mntp, "mntp_loss", 2)
    bad = tmp_path / "bad"
    words = r"stage 1's MNTP phase stopped at MNTP step 2: loss nan"
    with pytest.raises(NonFiniteTrainingError, match=words):
        stage1.train_stage1(_stage1_args(tiny, captions, bad, *argv))
    assert calls["n"] == 1 and not (bad / "mntp" / "merged").exists()
