"""timm towers (``VisionTower`` kind "timm"): built from a model name without downloading, pre-logits
pooling, layer ids / freezing / FSDP layers / gradient checkpointing, save and load through
LLM2CLIPModel, preprocessing from timm's data config (against timm's own eval transform), stage 2 from
``--vision-timm``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _timm_environment import require_timm
from PIL import Image

from llm2clip_fast.data.image_transforms import image_transform_for
from llm2clip_fast.models.image_preprocessing import CLIP_MEAN, ImagePreprocessing
from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip_fast.models.vision import VisionTower

# A two-block EVA02-CLIP-style tower at 32 pixels (timm's registered architecture, shrunk).
EVA_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}


@pytest.fixture(autouse=True)
def _timm():
    require_timm()


def _eva(**extra) -> VisionTower:
    torch.manual_seed(0)
    return VisionTower.from_timm("eva02_base_patch16_clip_224", {**EVA_ARGS, **extra})


def test_tower_geometry_pooling_and_layer_ids():
    timm = require_timm()
    tower = _eva().eval()
    assert (tower.kind, tower.hidden_size, tower.image_size, tower.num_layers) == ("timm", 32, 32, 2)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = tower(pixels)
        # timm's pre-logits features: the class token after the final norm (global_pool 'token')
        assert torch.equal(pooled, tower.model.forward_features(pixels)[:, 0])
    assert pooled.shape == (3, 32)
    ids = {name: tower.layer_id(name) for name, _ in tower.named_parameters()}
    assert ids["model.cls_token"] == ids["model.pos_embed"] == ids["model.patch_embed.proj.weight"] == 0
    assert ids["model.blocks.0.attn.q_proj.weight"] == 1 and ids["model.blocks.1.mlp.fc2.bias"] == 2
    assert ids["model.norm.weight"] == 3
    assert tower.layer_modules() is tower.model.blocks and len(tower.layer_modules()) == 2
    # the stem is timm's own: its group_matcher's 'stem' pattern matches exactly the layer-0 parameters
    import re

    stem = re.compile(tower.model.group_matcher()["stem"])
    assert {n for n, i in ids.items() if i == 0} == {f"model.{n}" for n, _ in tower.model.named_parameters()
                                                     if stem.match(n)}
    with pytest.raises(ValueError, match=r"must be \(B, C, H, W\)"):
        tower(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="takes 32x32 images"):
        tower(torch.randn(1, 3, 16, 16))
    assert timm.__version__


def test_freeze_and_gradient_checkpointing():
    tower = _eva()
    tower.freeze_layers(1)
    frozen = {n for n, p in tower.named_parameters() if not p.requires_grad}
    assert "model.pos_embed" in frozen and "model.blocks.0.norm1.weight" in frozen
    assert not any(n.startswith("model.blocks.1.") or n.startswith("model.norm.") for n in frozen)
    with pytest.raises(ValueError, match=r"freeze_vision_layers must be in 0\.\.2"):
        tower.freeze_layers(3)

    tower = _eva().train()
    pixels = torch.randn(2, 3, 32, 32)
    grads = []
    for enabled in (False, True):
        tower.set_gradient_checkpointing(enabled)
        assert tower.checkpointed_layers == (2 if enabled else 0)
        tower.zero_grad()
        tower(pixels).square().sum().backward()
        grads.append(tower.model.blocks[0].attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_token_and_position_tables_are_not_decayed():
    from llm2clip_fast.train.optim import adamw_param_groups

    tower = _eva()
    groups = adamw_param_groups(tower.named_parameters(), 0.05, lr=1e-3,
                                no_decay_names=tower.no_weight_decay_names())
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]}
    # as timm's no_weight_decay() and the official EVA02-CLIP recipe
    assert {"model.pos_embed", "model.cls_token"} <= no_decay
    assert "model.patch_embed.proj.weight" not in no_decay and "model.blocks.0.mlp.fc2.weight" not in no_decay


def test_transformers_towers_keep_their_decay():
    """Only a timm tower names extra no-decay tables: a transformers ViT's 3-d embeddings.cls_token and
    position_embeddings are decayed, as they always were."""
    from llm2clip_fast.models.vision import VisionTower
    from llm2clip_fast.train.optim import adamw_param_groups

    vit = VisionTower.from_config("vit", {"image_size": 16, "patch_size": 8, "hidden_size": 16,
                                          "intermediate_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2})
    assert vit.no_weight_decay_names() == frozenset()
    groups = adamw_param_groups(vit.named_parameters(), 0.05, lr=1e-3,
                                no_decay_names=vit.no_weight_decay_names())
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert {"model.embeddings.cls_token", "model.embeddings.position_embeddings"} <= decayed


def test_stage2_optimizer_leaves_the_timm_tables_undecayed():
    import argparse

    from llm2clip_fast.train.stage2 import build_optimizer

    tower = _eva()
    config = LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=16, llm_dim=24,
                            adapter={"num_blocks": 1, "expansion": 2, "dropout": 0.0})
    model = LLM2CLIPModel(config, vision_tower=tower)
    args = argparse.Namespace(wd=0.05, lr=1e-3, llrd=0.85, beta2=0.98)
    optimizer = build_optimizer(model, args, model.named_parameters(), fused=False)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(model.vision.model.pos_embed)] == decay_of[id(model.vision.model.cls_token)] == 0.0
    assert decay_of[id(model.vision.model.patch_embed.proj.weight)] == 0.05


def test_save_and_load_round_trip(tmp_path):
    tower = _eva()
    config = LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=16, llm_dim=24,
                            adapter={"num_blocks": 1, "expansion": 2, "dropout": 0.0})
    model = LLM2CLIPModel(config, vision_tower=tower).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = LLM2CLIPModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.vision == {"kind": "timm",
                                    "config": {"model_name": "eva02_base_patch16_clip_224",
                                               "model_args": EVA_ARGS},
                                    "preprocessing": tower.preprocessing.to_dict()}
    assert loaded.preprocessing == tower.preprocessing
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), loaded.encode_image(pixels))


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="has no model 'no_such_model'"):
        VisionTower.from_timm("no_such_model")
    with pytest.raises(ValueError, match=r"may not set \['num_classes', 'pretrained'\]"):
        VisionTower.from_timm("eva02_base_patch16_clip_224", {"pretrained": True, "num_classes": 5})
    with pytest.raises(ValueError, match="unknown fields"):
        VisionTower.from_config("timm", {"model_name": "vit_tiny_patch16_224", "weights": "x"})
    with pytest.raises(ValueError, match="does not take model_args"):
        VisionTower.from_timm("vit_tiny_patch16_224", {**VIT_ARGS, "no_such_arg": 1})
    with pytest.raises(ValueError, match="no 'blocks' sequence"):
        VisionTower.from_timm("resnet10t")
    from llm2clip_fast.models import timm_vision

    with pytest.raises(TypeError, match="must come from create_timm_model"):
        VisionTower("timm", torch.nn.Linear(2, 2))
    assert timm_vision.check_config({"model_name": "x"}) == {"model_name": "x", "model_args": {}}


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


@pytest.mark.parametrize(("overrides", "expected"), [
    # eva02 clip at 224: crop_pct 0.9 (floor(32 / 0.9) = 35 before the crop), bicubic, OpenAI CLIP stats
    ({}, {"resize": "shortest_edge", "resize_size": 35, "resample": "bicubic", "mean": CLIP_MEAN}),
    ({"crop_pct": 1.0}, {"resize": "shortest_edge", "resize_size": None}),
    ({"crop_mode": "squash", "crop_pct": 0.875, "interpolation": "bilinear"},
     {"resize": "square", "resize_size": 36, "resample": "bilinear"}),
    ({"crop_mode": "squash", "crop_pct": 1.0}, {"resize": "square", "resize_size": None}),
])
@pytest.mark.parametrize("hw", [(50, 70), (64, 41)])
def test_preprocessing_matches_timms_eval_transform(overrides, expected, hw):
    timm = require_timm()
    tower = _eva()
    data_config = timm.data.resolve_data_config({"input_size": (3, 32, 32), **overrides}, model=tower.model)
    prep = ImagePreprocessing.from_timm(data_config)
    for name, value in expected.items():
        assert getattr(prep, name) == (tuple(value) if isinstance(value, tuple) else value), name
    if not overrides:
        assert tower.preprocessing == prep  # a timm tower's default is its data config
    image = _image(*hw)
    want = timm.data.create_transform(**data_config, is_training=False)(image)
    got = image_transform_for(prep, train=False)(image)
    assert got.shape == want.shape == (3, 32, 32)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_stage2_from_a_random_timm_tower(tmp_path):
    from _stage2_runs import make_demo

    from llm2clip_fast.train.__main__ import main as train_main

    demo = make_demo(tmp_path / "demo")
    run = tmp_path / "run"
    common = ["--embeddings", str(demo["cache"]), "--data", str(demo["data"]), "--batch-size", "8", "--steps",
              "2", "--num-workers", "0", "--no-progress", "--embed-dim", "16", "--adapter-blocks", "1"]
    assert train_main(["stage2", "--out", str(run), "--vision-timm", "vit_tiny_patch16_224",
                       "--vision-timm-args", '{"img_size": 32, "patch_size": 8, "depth": 2}', *common]) == 0
    model = LLM2CLIPModel.from_pretrained(run / "model")
    assert model.config.vision["config"] == {"model_name": "vit_tiny_patch16_224",
                                             "model_args": {"img_size": 32, "patch_size": 8, "depth": 2}}
    assert model.vision.num_layers == 2 and model.image_size == 32
    with pytest.raises(ValueError, match="one of --vision-preset, --vision-path and --vision-timm"):
        train_main(["stage2", "--out", str(tmp_path / "x"), "--vision-timm", "vit_tiny_patch16_224",
                    "--vision-preset", "micro", *common])
    with pytest.raises(ValueError, match="--vision-timm-args must be a JSON object"):
        train_main(["stage2", "--out", str(tmp_path / "y"), "--vision-timm", "vit_tiny_patch16_224",
                    "--vision-timm-args", "[1]", *common])
    with pytest.raises(ValueError, match="--vision-timm-args goes with --vision-timm"):
        train_main(["stage2", "--out", str(tmp_path / "z"), "--vision-timm-args", "{}", *common])
