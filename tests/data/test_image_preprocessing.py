"""Each tower's own image preprocessing, against transformers' image processors (PIL backends,
transformers 5.24), read from a folder's preprocessor_config.json, saved with the model, and used by
training and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llm2clip_fast.data.image_transforms import image_transform_for
from llm2clip_fast.models.image_preprocessing import CLIP_MEAN, ImagePreprocessing


def _image(h: int = 50, w: int = 70, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def _processor(kind: str, size: int):
    import transformers

    if kind == "clip":
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                  crop_size={"height": size, "width": size})
    if kind == "siglip":
        return transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
    return transformers.ViTImageProcessorPil(size={"height": size, "width": size})


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit"])
# Even crop margins only: for an odd margin the centre crop is one pixel off between torchvision's
# CenterCrop (rounds; OpenAI CLIP, OpenCLIP and LLM2CLIP's evaluation use it, and so do we) and
# transformers' center_crop (floors).
@pytest.mark.parametrize("hw", [(50, 70), (64, 42)])
def test_eval_transform_matches_the_transformers_processor(tmp_path, kind, hw):
    processor = _processor(kind, 32)
    processor.save_pretrained(tmp_path)
    prep = ImagePreprocessing.from_hf_folder(tmp_path, kind, 32)
    assert prep == ImagePreprocessing.default_for(kind, 32)  # the family defaults are the processor's
    image = _image(*hw)
    want = processor(images=image, return_tensors="pt")["pixel_values"][0]
    got = image_transform_for(prep, train=False)(image)
    assert got.shape == want.shape == (3, 32, 32)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_folder_values_win_and_a_size_mismatch_is_an_error(tmp_path):
    import transformers

    p = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                           image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.6, 0.7], resample=2)
    p.save_pretrained(tmp_path)
    prep = ImagePreprocessing.from_hf_folder(tmp_path, "clip", 32)
    assert prep.mean == (0.1, 0.2, 0.3) and prep.std == (0.5, 0.6, 0.7) and prep.resample == "bilinear"
    assert prep.resize == "shortest_edge" and prep.resize_size == 40
    image = _image(51, 77, seed=3)
    torch.testing.assert_close(image_transform_for(prep)(image), p(images=image, return_tensors="pt")
                               ["pixel_values"][0], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="images of 32 pixels, but the tower takes 48"):
        ImagePreprocessing.from_hf_folder(tmp_path, "clip", 48)
    assert ImagePreprocessing.from_hf_folder(tmp_path / "none", "siglip", 16).mean == (0.5, 0.5, 0.5)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="resize must be"):
        ImagePreprocessing(32, resize="crop")
    with pytest.raises(ValueError, match="resample must be"):
        ImagePreprocessing(32, resample="lanczos")
    with pytest.raises(ValueError, match="std > 0"):
        ImagePreprocessing(32, std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="unknown fields"):
        ImagePreprocessing.from_dict({"image_size": 32, "crop": True})


def test_towers_carry_it_and_models_save_it(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
    from llm2clip_fast.models.vision import VisionTower

    siglip = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    SiglipVisionModel(siglip).save_pretrained(tmp_path / "t")
    tower = VisionTower.from_pretrained(tmp_path / "t")  # no preprocessor_config.json: SigLIP's defaults
    assert tower.preprocessing == ImagePreprocessing.default_for("siglip", 32)
    with pytest.raises(ValueError, match="16-pixel images but the tower takes 32"):
        tower.preprocessing = ImagePreprocessing(16)
    config = LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=8, text_tower="llm-adapter", llm_dim=16,
                            adapter={"num_blocks": 1})
    LLM2CLIPModel(config, vision_tower=tower).save_pretrained(tmp_path / "m")
    loaded = LLM2CLIPModel.from_pretrained(tmp_path / "m")
    assert loaded.preprocessing == tower.preprocessing and loaded.preprocessing.std == (0.5, 0.5, 0.5)
    # a model saved before towers carried their preprocessing keeps the CLIP statistics it trained with
    legacy = LLM2CLIPConfig(vision={"kind": "siglip", "config": tower.config_dict()["config"]}, embed_dim=8,
                            text_tower="llm-adapter", llm_dim=16, adapter={"num_blocks": 1})
    old = LLM2CLIPModel(legacy)
    assert old.preprocessing.mean == CLIP_MEAN and old.preprocessing.resize == "shortest_edge"


def test_stage2_trains_a_siglip_tower_with_siglip_preprocessing(tmp_path, monkeypatch):
    from _stage2_runs import make_demo, stage2_args
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from llm2clip_fast.data import image_transforms
    from llm2clip_fast.models.llm2clip import LLM2CLIPModel
    from llm2clip_fast.train.__main__ import main as train_main

    seen = []
    original = image_transforms.ClipImageTransform.__call__

    def spy(self, image, rng=None):
        seen.append((self.train, self.mean, self.resize))
        return original(self, image, rng)

    monkeypatch.setattr(image_transforms.ClipImageTransform, "__call__", spy)
    siglip = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    SiglipVisionModel(siglip).save_pretrained(tmp_path / "t")
    demo = make_demo(tmp_path)
    args = stage2_args(demo, tmp_path / "run", steps=1)
    i = args.index("--vision-preset")
    args[i:i + 2] = ["--vision-path", str(tmp_path / "t")]
    assert train_main(args) == 0
    train_calls = [c for c in seen if c[0]]
    assert train_calls and all(m == (0.5, 0.5, 0.5) and r == "square" for _, m, r in train_calls)
    assert LLM2CLIPModel.from_pretrained(tmp_path / "run" / "model").preprocessing.resize == "square"


def test_timm_data_configs_it_cannot_reproduce_are_refused():
    base = {"input_size": (3, 32, 32), "mean": CLIP_MEAN, "std": CLIP_MEAN}
    with pytest.raises(ValueError, match="crop_mode 'border' is not supported"):
        ImagePreprocessing.from_timm({**base, "crop_mode": "border"})
    with pytest.raises(ValueError, match="interpolation 'nearest' is not supported"):
        ImagePreprocessing.from_timm({**base, "interpolation": "nearest"})
    with pytest.raises(ValueError, match=r"crop_pct 1\.2 is not supported"):
        ImagePreprocessing.from_timm({**base, "crop_pct": 1.2})
    with pytest.raises(ValueError, match="only square"):
        ImagePreprocessing.from_timm({**base, "input_size": (3, 32, 48)})
    with pytest.raises(ValueError, match="resize_size must be an int >= image_size"):
        ImagePreprocessing(32, resize="square", resize_size=30)


def test_square_resize_then_centre_crop():
    # timm's 'squash' crop mode with crop_pct < 1: the whole image to 36 x 36, then the central 32 x 32
    prep = ImagePreprocessing(32, resize="square", resize_size=36, resample="bilinear")
    image = _image(50, 70, seed=5)
    want = np.asarray(image.resize((36, 36), Image.Resampling.BILINEAR).crop((2, 2, 34, 34)), np.float32)
    want = (want / 255.0 - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    got = image_transform_for(prep, train=False)(image)
    torch.testing.assert_close(got, torch.from_numpy(want).permute(2, 0, 1), atol=2e-6, rtol=0)
    assert ImagePreprocessing.from_dict(prep.to_dict()) == prep
