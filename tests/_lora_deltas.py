"""Reading a saved peft LoRA adapter's weight deltas straight from its files (tests' ground truth)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def lora_deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """{module name in the base model: (lora_alpha / r) * B @ A}, in float32."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in weights.items():
        if ".lora_A." in key:
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            name = key.split("base_model.model.", 1)[1].split(".lora_A.")[0]
            out[name] = scale * (b.float() @ a.float())
    return out
