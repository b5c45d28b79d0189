"""LLM2CLIPModel and the vision towers: shapes, save/reload, zero-shot, bad input (CPU, tiny configs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip_fast.models.vision import VISION_PRESETS, VisionTower, build_vision_tower

TINY = {"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4}
LLM_DIM = 40
EMBED = 24


def tiny_config(kind: str = "clip", loss: str = "clip", text_tower: str = "llm-adapter") -> LLM2CLIPConfig:
    extra = ({"llm_dim": LLM_DIM, "adapter": {"num_blocks": 2, "expansion": 2, "dropout": 0.0}}
             if text_tower == "llm-adapter" else
             {"clip_text": {"width": 32, "layers": 2, "heads": 2, "context_length": 77}})
    return LLM2CLIPConfig(vision={"kind": kind, "config": dict(TINY)}, embed_dim=EMBED, loss=loss,
                          text_tower=text_tower, llm={"path": "/models/some-llm", "pooling": "mean"}, **extra)


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
def test_vision_kinds_pool_and_project(kind):
    torch.manual_seed(0)
    model = LLM2CLIPModel(tiny_config(kind))
    pixels = torch.randn(5, 3, 32, 32)
    feats = model.encode_image(pixels)
    assert feats.shape == (5, EMBED)
    normed = model.encode_image(pixels, normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(5))
    # Every image gets its own feature (pooling is per image, not mixed across the batch).
    torch.testing.assert_close(model.encode_image(pixels[2:3]), feats[2:3], atol=1e-5, rtol=1e-5)


def test_vision_layer_ids_cover_every_layer():
    for kind in ("clip", "siglip", "vit"):
        tower = VisionTower.from_config(kind, dict(TINY))
        ids = {tower.layer_id(n) for n, _ in tower.named_parameters()}
        assert ids == set(range(TINY["num_hidden_layers"] + 2)), kind
        assert tower.layer_id("model.embeddings.patch_embedding.weight") == 0
        assert len(tower.layer_modules()) == TINY["num_hidden_layers"]


def test_freeze_layers_freezes_stem_and_first_layers():
    tower = VisionTower.from_config("clip", dict(TINY))
    tower.freeze_layers(2)
    for name, p in tower.named_parameters():
        assert p.requires_grad == (tower.layer_id(name) > 2), name
    with pytest.raises(ValueError, match="freeze_vision_layers"):
        tower.freeze_layers(4)


def test_presets_and_build_errors():
    expected = VISION_PRESETS["demo-tiny"]["config"]["image_size"]
    assert VisionTower.from_preset("demo-tiny").image_size == expected
    with pytest.raises(ValueError, match="unknown vision preset 'nope'"):
        build_vision_tower(preset="nope")
    with pytest.raises(ValueError, match="exactly one"):
        build_vision_tower()
    with pytest.raises(ValueError, match="kind must be one of"):
        VisionTower.from_config("resnet", {})


def test_vision_from_pretrained_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    full = CLIPModel(CLIPConfig(vision_config=dict(TINY), text_config=text))
    full.save_pretrained(tmp_path / "clip")
    tower = VisionTower.from_pretrained(tmp_path / "clip")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(tower(pixels), expected)
    with pytest.raises(ValueError, match=r"no config\.json"):
        VisionTower.from_pretrained(tmp_path / "missing")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_outputs_and_logit_parameters(loss):
    torch.manual_seed(0)
    model = LLM2CLIPModel(tiny_config(loss=loss))
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, LLM_DIM))
    assert out["image_features"].shape == out["text_features"].shape == (4, EMBED)
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(4))
    if loss == "clip":
        assert math.isclose(out["logit_scale"].item(), 1 / 0.07, rel_tol=1e-5)
        assert "logit_bias" not in out
    else:
        assert math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-5)
        assert out["logit_bias"].item() == -10.0
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(model.logit_scale_value().item(), 100.0, rel_tol=1e-5)


@pytest.mark.parametrize("text_tower", ["llm-adapter", "clip"])
def test_save_reload_bit_identical(tmp_path, text_tower):
    torch.manual_seed(1)
    model = LLM2CLIPModel(tiny_config(loss="siglip", text_tower=text_tower)).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["llm"]["path"] == "/models/some-llm" and config["text_tower"] == text_tower

    rng_before = torch.get_rng_state()
    loaded = LLM2CLIPModel.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(torch.get_rng_state(), rng_before)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype for k in sd)

    pixels = torch.randn(3, 3, 32, 32)
    if text_tower == "llm-adapter":
        text = (torch.randn(3, LLM_DIM),)
    else:
        text = model.tokenize(["a red square", "a blue circle left of a green star", "x"])
    with torch.no_grad():
        a, b = model(pixels, *text), loaded(pixels, *text)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _TableEncoder:
    """A stand-in LLM encoder with a fixed embedding per caption (what LLMTextEncoder.encode returns)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, texts, batch_size=32, show_progress=False):
        g = torch.Generator().manual_seed(0)
        table = torch.randn(1000, self.dim, generator=g)
        return torch.stack([table[sum(map(ord, t)) % 1000] for t in texts])


def test_encode_captions_and_zero_shot():
    torch.manual_seed(0)
    model = LLM2CLIPModel(tiny_config()).eval()
    encoder = _TableEncoder(LLM_DIM)
    texts = ["a red square", "two circles", "a star"]
    emb = model.encode_captions(texts, encoder, batch_size=2)
    with torch.no_grad():
        expected = model.encode_text(encoder.encode(texts), normalize=True)
    torch.testing.assert_close(emb, expected)

    classes = model.class_prompt_embeddings(["cat", "dog"], encoder, templates=["a photo of a {label}.",
                                                                                "a {label}."])
    assert classes.shape == (2, EMBED)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(2))

    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        own = model.encode_image(pixels)
    probs, preds = model.zero_shot_classify(pixels, own)
    assert torch.equal(preds, torch.arange(4))
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(4))

    with pytest.raises(TypeError, match="encoder"):
        model.encode_captions(texts)
    with pytest.raises(ValueError, match="llm_dim=40"):
        model.encode_captions(texts, _TableEncoder(LLM_DIM + 1))


def test_bad_inputs_are_clear():
    model = LLM2CLIPModel(tiny_config())
    with pytest.raises(ValueError, match="takes 32x32 images"):
        model.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 40\)"):
        model.encode_text(torch.randn(2, 41))
    with pytest.raises(TypeError, match="clip"):
        model.encode_text(torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="tokenize"):
        model.tokenize(["x"])
    with pytest.raises(ValueError, match="text_tower"):
        LLM2CLIPConfig(vision={"kind": "clip", "config": TINY}, text_tower="bert")
    with pytest.raises(ValueError, match="llm_dim"):
        LLM2CLIPConfig(vision={"kind": "clip", "config": TINY})
    with pytest.raises(FileNotFoundError, match="missing"):
        LLM2CLIPModel.from_pretrained("/nonexistent/model")


def test_encode_captions_with_the_packaged_minilm_encoder():
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder, packaged_minilm_path

    encoder = LLMTextEncoder.from_pretrained(packaged_minilm_path())
    config = LLM2CLIPConfig(vision={"kind": "clip", "config": dict(TINY)}, embed_dim=EMBED,
                            llm_dim=encoder.embedding_dim,
                            adapter={"num_blocks": 1, "expansion": 2, "dropout": 0.0})
    torch.manual_seed(0)
    model = LLM2CLIPModel(config).eval()
    texts = ["a large red circle left of a small blue cross", "a green square", "two yellow diamonds"]
    emb = model.encode_captions(texts, encoder, batch_size=2)
    with torch.no_grad():
        expected = model.encode_text(encoder.encode(texts, show_progress=False), normalize=True)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    assert emb.shape == (3, EMBED)
