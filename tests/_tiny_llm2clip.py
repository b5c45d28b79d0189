"""A tiny LLM2CLIPModel with a CLIP text tower (no LLM needed), for the eval tests. Not a test module."""

from __future__ import annotations

import torch

from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip_fast.models.vision import VisionTower


def tiny_clip_tower_model() -> LLM2CLIPModel:
    """Seeded: the same weights every call (32 px images, 16-dim embeddings)."""
    torch.manual_seed(0)
    vision = VisionTower.from_config("clip", {"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 1,
                                              "num_attention_heads": 2})
    config = LLM2CLIPConfig(vision=vision.config_dict(), embed_dim=16, text_tower="clip",
                            clip_text={"width": 32, "layers": 1, "heads": 2})
    return LLM2CLIPModel(config, vision_tower=vision)
