"""A tiny LLM2CLIP Hugging Face release on disk (config.json, remote-code stub, safetensors shards), with the
official adapter (TextProj): what the converter tests and the tests that build on a converted release
share."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _llm2clip_official_reference import TextProj
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 16, "patch_size": 8, "hidden_act": "quick_gelu", "projection_dim": 20}
LLM_DIM, EMBED_DIM, BLOCKS = 24, 20, 3


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Non-default LayerNorm affines and biases, so a swapped or skipped tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _release_parts(seed: int = 0):
    """The pieces of a tiny LLM2CLIP HF release: vision tower, projection, official adapter, logit scale."""
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    projection = torch.nn.Linear(VISION["hidden_size"], EMBED_DIM, bias=False)
    adapter = TextProj(embedding_dim=LLM_DIM, output_dim=EMBED_DIM, expansion_factor=2,
                       num_layers_text=BLOCKS).eval()
    _perturb(tower, seed + 1)
    _perturb(adapter, seed + 2)
    return tower, projection, adapter, torch.tensor(3.9)


def _release_state(tower, projection, adapter, logit_scale) -> dict[str, torch.Tensor]:
    state = {f"vision_model.{k}": v for k, v in tower.state_dict().items()}
    state["visual_projection.weight"] = projection.weight.detach()
    for k, v in adapter.state_dict().items():
        state["text_adapter.adaptor." + k.removeprefix("text_adaptor.")] = v
    state["logit_scale"] = logit_scale
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _write_release(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LLM2CLIPModel"], "model_type": "clip", "projection_dim": EMBED_DIM,
              "logit_scale_init_value": 2.6592,
              "auto_map": {"AutoModel": "modeling_llm2clip.LLM2CLIPModel"},
              "text_config": {"hidden_size": 16, "model_type": "clip_text_model"},
              # a transformers 4.x to_dict() writes legacy fields too; they must not get in the way
              "vision_config": {**VISION, "model_type": "clip_vision_model", "transformers_version": "4.44.2",
                                "torch_dtype": "float32", "bad_words_ids": None, "chunk_size_feed_forward": 0,
                                "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_llm2clip.py").write_text("raise RuntimeError('remote code must never run')\n")
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
    else:
        keys = sorted(state)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in keys[i::shards]}
            save_file(part, str(folder / name))
            weight_map.update(dict.fromkeys(part, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder
