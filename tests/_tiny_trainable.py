"""A tiny trainable model with its AdamW groups and warm-up cosine schedule, for the checkpoint and
optimizer tests (imported by test modules, not a test module)."""

from __future__ import annotations

import torch
from torch import nn

from llm2clip_fast.train.optim import adamw_param_groups, build_scheduler


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)
        self.logit_scale = nn.Parameter(torch.tensor(2.5))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched, n: int) -> None:
    for _ in range(n):
        x = torch.randn(4, 5)
        y = model.out(model.norm(model.lin(x))).square().mean() * model.logit_scale
        opt.zero_grad()
        y.backward()
        opt.step()
        sched.step()


def make_tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyModel()
    opt = torch.optim.AdamW(adamw_param_groups(model.named_parameters(), 0.1, lr=1e-2))
    sched = build_scheduler(opt, "cosine", warmup_steps=2, total_steps=10)
    return model, opt, sched
