"""``python -m llm2clip_fast.convert --from eva-clip``: tiny EVA-CLIP state dicts with exactly the official
key names (tests/_eva_clip_reference.py, tests/_llm2clip_official_reference.py), converted onto a timm
EVA02 tower, loaded, and compared with the official forwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _eva_clip_checkpoint import LLM_DIM, TINY, _config_file, _official, _state, _write
from _timm_environment import require_timm

from llm2clip_fast.convert.__main__ import cli, main
from llm2clip_fast.convert.errors import SourceMismatchError
from llm2clip_fast.models.image_preprocessing import ImagePreprocessing
from llm2clip_fast.models.llm2clip import LLM2CLIPModel


@pytest.fixture(autouse=True)
def _timm():
    require_timm()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize(("suffix", "wrapper", "qv_bias"), [(".safetensors", None, "proj"),
                                                           (".pt", "model", "separate"),
                                                           (".bin", "state_dict", "proj")])
def test_converted_model_matches_the_official_forward(tmp_path, suffix, wrapper, qv_bias):
    visual, text, logit_scale = _official()
    state = _state(visual, text, logit_scale, qv_bias)
    if suffix == ".bin":  # the older layout the official load_checkpoint also reads
        state["text.logit_scale"] = state.pop("logit_scale")
    src = _write(tmp_path / f"eva{suffix}", state, wrapper)
    out = tmp_path / "converted"
    assert main(["--from", "eva-clip", str(src), "--out", str(out),
                 "--model-config", _config_file(tmp_path)]) == 0
    model = LLM2CLIPModel.from_pretrained(out).eval()
    cfg = model.config
    assert cfg.vision["kind"] == "timm" and cfg.projection_bias and cfg.adapter["input_norm"] == "l2"
    assert cfg.vision["config"]["model_args"]["num_heads"] == 4 and model.vision.num_layers == 2
    # the official eval transform: short side to 32 (bicubic), centre crop, OpenAI CLIP mean/std
    assert model.preprocessing == ImagePreprocessing(32)
    pixels = torch.randn(5, 3, 32, 32)
    embeddings = 3.0 * torch.randn(7, LLM_DIM)
    with torch.no_grad():
        # fp32, same arithmetic in another order (timm's SDPA, its fused RoPE): 1e-5 on outputs of ~1
        assert _max_diff(model.encode_image(pixels), visual(pixels)) <= 1e-5
        # 1e-5, as for the image side: the lean adapter's C++ kernels round fp32 differently from torch's.
        assert _max_diff(model.encode_text(embeddings), text(embeddings)) <= 1e-5
    assert model.logit_scale.item() == pytest.approx(4.1)
    provenance = json.loads((out / "conversion.json").read_text())
    assert provenance["from"] == "eva-clip" and provenance["geometry"]["heads"] == 4
    # the RoPE tables (the shared module's and each block's copy) are checked, not copied
    assert provenance["rope_tables_checked"] == 2 * (1 + 2)
    assert provenance["dropped"] == sorted(k for k in _state(visual, text, logit_scale) if ".rope." in k)


def test_strict_mapping_lists_every_problem(tmp_path, capsys):
    visual, text, logit_scale = _official(seed=3)
    state = _state(visual, text, logit_scale)
    del state["visual.blocks.1.mlp.w3.bias"]
    state["visual.mask_token"] = torch.zeros(1, 1, 64)
    state["visual.blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    src = _write(tmp_path / "eva.safetensors", state)
    with pytest.raises(SourceMismatchError) as err:
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "x"), "--model-config",
              _config_file(tmp_path)])
    message = str(err.value)
    assert "unknown keys (1): visual.mask_token" in message
    assert "missing keys (1): visual.blocks.1.mlp.w3.bias" in message
    assert ("visual.blocks.0.attn.proj.weight (64, 32) -> vision.model.blocks.0.attn.proj.weight expects "
            "(64, 64)") in message
    assert cli(["--from", "eva-clip", str(src), "--out", str(tmp_path / "x"), "--model-config",
                _config_file(tmp_path)]) == 5
    assert not (tmp_path / "x").exists()
    assert "does not match" in capsys.readouterr().err


def test_an_unknown_text_key_is_a_mismatch(tmp_path):
    visual, text, logit_scale = _official(seed=7)
    state = _state(visual, text, logit_scale)
    state["text.text_projection"] = torch.zeros(3)
    src = _write(tmp_path / "eva.safetensors", state)
    with pytest.raises(SourceMismatchError, match=r"unknown keys \(1\): text\.text_projection"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "x"), "--model-config",
              _config_file(tmp_path)])


def test_geometry_must_fit_the_tensors_and_the_rope_tables(tmp_path):
    visual, text, logit_scale = _official(seed=4)
    src = _write(tmp_path / "eva.safetensors", _state(visual, text, logit_scale))
    # a head count the shapes cannot show: the RoPE tables (per-head size) give it away
    heads_8 = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "head_width": 8}}
    with pytest.raises(SourceMismatchError, match="RoPE tables that do not match"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "a"), "--model-config",
              _config_file(tmp_path, heads_8)])
    other_grid = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "pt_hw_seq_len": 8}}
    with pytest.raises(SourceMismatchError, match="RoPE tables that do not match"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "b"), "--model-config",
              _config_file(tmp_path, other_grid)])
    plain = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "naiveswiglu": False, "subln": False}}
    with pytest.raises(ValueError, match=r"naiveswiglu=False \(needs True\); subln=False"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "c"), "--model-config",
              _config_file(tmp_path, plain)])
    # heads are in no shape: a tiny model matches no named config, so one must be given
    with pytest.raises(ValueError, match="--model or give its official model-config"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "d")])
    with pytest.raises(SourceMismatchError, match="shape mismatches"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "e"), "--model", "EVA02-CLIP-B-16"])
    with pytest.raises(ValueError, match="unknown EVA-CLIP model 'EVA02-CLIP-H-14'"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "f"), "--model", "EVA02-CLIP-H-14"])
    with pytest.raises(ValueError, match="--model, --model-config only apply to --from eva-clip"):
        main(["--from", "open_clip", str(src), "--out", str(tmp_path / "g"), "--llm-dim", "8", "--embed-dim",
              "8", "--model", "EVA02-CLIP-B-16", "--model-config", "x.json"])
    with pytest.raises(ValueError, match="--embed-dim only apply to --from hf-clip / open_clip"):
        main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "h"), "--embed-dim", "8"])


@pytest.mark.parametrize(("name", "timm_name", "heads", "image", "hidden"),
                         [("EVA02-CLIP-B-16", "eva02_base_patch16_clip_224", 12, 224, 2048),
                          ("EVA02-CLIP-L-14", "eva02_large_patch14_clip_224", 16, 224, 2730),
                          ("EVA02-CLIP-L-14-336", "eva02_large_patch14_clip_336", 16, 336, 2730)])
def test_named_models_are_timms_eva02_clip_architectures(name, timm_name, heads, image, hidden):
    timm = require_timm()
    from llm2clip_fast.convert.eva_clip_vision import infer_named_model, named_geometry
    from llm2clip_fast.models.vision import VisionTower

    geometry = named_geometry(name)
    assert (geometry.heads, geometry.image_size, geometry.mlp_hidden, geometry.embed_dim) == (
        heads, image, hidden, 1280)
    with torch.device("meta"):
        ours = VisionTower.from_config("timm", geometry.timm_config()).model
        theirs = timm.create_model(timm_name, pretrained=False, num_classes=0)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.blocks[0].attn.num_heads == theirs.blocks[0].attn.num_heads == heads
    assert ours.rope.ref_feat_shape == theirs.rope.ref_feat_shape
    # without --model, the tensor sizes of an official checkpoint pick its config
    shapes = {f"visual.{k}": torch.empty(s, device="meta") for k, s in shapes.items()}
    shapes["visual.head.weight"] = torch.empty(1280, geometry.width, device="meta")
    assert infer_named_model(shapes) == name


def test_dtype_is_kept_unless_asked(tmp_path):
    visual, text, logit_scale = _official(seed=5)
    state = {k: v.half() for k, v in _state(visual, text, logit_scale).items()}
    src = _write(tmp_path / "eva.safetensors", state)
    half = LLM2CLIPModel.from_pretrained(main_out(tmp_path / "half", src, tmp_path))
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert torch.equal(half.visual_projection.bias, state["visual.head.bias"])
    full = LLM2CLIPModel.from_pretrained(main_out(tmp_path / "full", src, tmp_path, "--dtype", "float32"))
    assert {p.dtype for p in full.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fp32_release_converts_to_half_precision(tmp_path, dtype):
    """--dtype casts after the RoPE check: an fp32 file's (right) tables must not fail against a rounded
    copy of timm's."""
    visual, text, logit_scale = _official(seed=6)
    src = _write(tmp_path / "eva.safetensors", _state(visual, text, logit_scale))
    half = LLM2CLIPModel.from_pretrained(main_out(tmp_path / "half", src, tmp_path, "--dtype", dtype))
    assert {p.dtype for p in half.parameters()} == {getattr(torch, dtype)}


def main_out(out: Path, src: Path, tmp_path: Path, *extra: str) -> Path:
    assert main(["--from", "eva-clip", str(src), "--out", str(out), "--model-config", _config_file(tmp_path),
                 *extra]) == 0
    return out


def test_stage2_continues_from_a_converted_eva_clip_model(tmp_path):
    from _stage2_runs import DIM, make_demo

    from llm2clip_fast.train.__main__ import main as train_main

    assert DIM == LLM_DIM
    demo = make_demo(tmp_path / "demo")
    visual, text, logit_scale = _official(seed=6)
    src = _write(tmp_path / "eva.safetensors", _state(visual, text, logit_scale))
    converted = LLM2CLIPModel.from_pretrained(main_out(tmp_path / "converted", src, tmp_path))
    run = tmp_path / "run"
    assert train_main(["stage2", "--init-model", str(tmp_path / "converted"),
                       "--embeddings", str(demo["cache"]), "--data", str(demo["data"]), "--out", str(run),
                       "--batch-size", "8", "--steps", "2", "--num-workers", "0", "--no-progress",
                       "--lr", "1e-3", "--freeze-vision-layers", "1", "--grad-checkpointing"]) == 0
    trained = LLM2CLIPModel.from_pretrained(run / "model")
    assert trained.config.vision == converted.config.vision and trained.config.projection_bias
    before, after = converted.state_dict(), trained.state_dict()
    assert torch.equal(after["vision.model.blocks.0.attn.q_proj.weight"],
                       before["vision.model.blocks.0.attn.q_proj.weight"])  # frozen: stem and block 0
    assert torch.equal(after["vision.model.pos_embed"], before["vision.model.pos_embed"])
    for key in ("vision.model.blocks.1.attn.q_proj.weight", "visual_projection.bias",
                "text_adapter.blocks.0.fc1.weight"):
        assert not torch.equal(after[key], before[key]), key


def test_missing_timm_and_a_broken_torchvision_are_named(tmp_path, monkeypatch, capsys):
    from llm2clip_fast.missing_dependency import MissingDependencyError
    from llm2clip_fast.models import timm_vision

    visual, text, logit_scale = _official(seed=7)
    src = _write(tmp_path / "eva.safetensors", _state(visual, text, logit_scale))
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "llm2clip_fast\[timm\]"'):
        timm_vision.import_timm()
    assert cli(["--from", "eva-clip", str(src), "--out", str(tmp_path / "x"), "--model-config",
                _config_file(tmp_path)]) == 9
    assert "timm vision towers need timm" in capsys.readouterr().err

    # A torchvision whose compiled part does not fit this torch fails at import, as a CUDA build beside
    # the CPU torch wheel does; timm imports it at import time.
    fake = tmp_path / "fake_site"
    (fake / "timm").mkdir(parents=True)
    (fake / "torchvision").mkdir()
    (fake / "timm" / "__init__.py").write_text("import torchvision\n")
    (fake / "torchvision" / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "timm")
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.syspath_prepend(str(fake))
    with pytest.raises(MissingDependencyError) as err:
        timm_vision.import_timm()
    message = str(err.value)
    assert f"torch {torch.__version__}" in message and "torchvision" in message
    assert "operator torchvision::nms does not exist" in message and "must be builds of the same" in message
