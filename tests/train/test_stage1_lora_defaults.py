"""Stage 1's LoRA defaults are the published recipe: r=16, alpha=32, dropout 0.05 on the q/k/v/o and
gate/up/down projections of every layer; the logit scale defaults to 50."""

from __future__ import annotations

import argparse

import torch
from _tiny_llama import write_tiny_llama

from llm2clip_fast.train import stage1


def test_lora_defaults_reach_the_peft_model(tmp_path):
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    args = parser.parse_args(["--llm", str(write_tiny_llama(tmp_path / "llm")), "--data", "unused",
                              "--out", str(tmp_path / "out")])
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets) == (16, 32.0, 0.05, "auto")
    assert args.scale == 50.0 and args.pooling == "mean"
    built = stage1.build_trainable_encoder(args, torch.device("cpu"))
    cfg = built.peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32.0, 0.05)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(cfg.target_modules) == projections
    adapted = {name.rsplit(".", 1)[-1]: module for name, module in built.peft_model.named_modules()
               if hasattr(module, "lora_A") and "default" in module.lora_A}
    assert set(adapted) == projections  # one layer: each projection adapted once
    for module in adapted.values():
        assert module.lora_A["default"].weight.shape[0] == 16
        assert module.scaling["default"] == 32.0 / 16
        assert module.lora_dropout["default"].p == 0.05
    trainable = {n for n, p in built.peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
