"""``python -m llm2clip_fast.convert --from open_clip`` / ``--to open_clip``: tiny OpenCLIP ViT CLIPs with
exactly OpenCLIP's key names (built by a transcription of open_clip_torch 3.3.0's ``VisionTransformer``),
converted, loaded and compared against that forward; and the way back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _open_clip_reference import build_vision_tower, clip_state_dict
from _open_clip_tower import EMBED_DIM, VISION_CFG, _tower
from safetensors.torch import load_file, save_file

from llm2clip_fast.convert.__main__ import cli, main
from llm2clip_fast.convert.errors import OutputExistsError, SourceMismatchError
from llm2clip_fast.models.image_preprocessing import CLIP_MEAN, CLIP_STD, ImagePreprocessing
from llm2clip_fast.models.llm2clip import LLM2CLIPModel

LLM_DIM, HEADS = 8, 4
ACTS = {"quick_gelu": True, "gelu": False}


def _write_hub(folder: Path, state: dict[str, torch.Tensor], model_cfg: dict | None = None,
               preprocess_cfg: dict | None = None, pickled: bool = False) -> Path:
    """An OpenCLIP hub folder as ``push_to_hf_hub.save_for_hf`` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg or {"embed_dim": EMBED_DIM, "vision_cfg": VISION_CFG,
                                         "text_cfg": {"width": 16, "heads": 2, "layers": 1}},
              "preprocess_cfg": preprocess_cfg if preprocess_cfg is not None else {"mean": list(CLIP_MEAN),
                                                                                   "std": list(CLIP_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if pickled:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def _model_cfg(quick_gelu: bool | None) -> dict:
    cfg = {"embed_dim": EMBED_DIM, "vision_cfg": VISION_CFG, "text_cfg": {"width": 16}}
    if quick_gelu is not None:
        cfg["quick_gelu"] = quick_gelu
    return cfg


def _pooled(visual, pixels: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's pooled feature before ``proj`` (its forward with ``proj = None``)."""
    proj, visual.proj = visual.proj, None
    try:
        return visual(pixels)
    finally:
        visual.proj = proj


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _convert(src: Path, out: Path, *extra: str, llm_dim: int = LLM_DIM) -> LLM2CLIPModel:
    assert main(["--from", "open_clip", str(src), "--out", str(out), "--llm-dim", str(llm_dim), *extra]) == 0
    return LLM2CLIPModel.from_pretrained(out).eval()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("pickled", [False, True])
def test_hub_folder_matches_the_open_clip_forward(tmp_path, act, pickled):
    visual = _tower(ACTS[act])
    src = _write_hub(tmp_path / "hub", clip_state_dict(visual), _model_cfg(ACTS[act]), pickled=pickled)
    model = _convert(src, tmp_path / "kept", "--keep-projection")
    torch.manual_seed(3)
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = visual(pixels)
        assert _max_diff(model.encode_image(pixels), expected) <= 1e-5
        # the other activation gives another model: the comparison can fail
        other = _tower(not ACTS[act])
        other.load_state_dict(visual.state_dict())
        assert _max_diff(model.encode_image(pixels), other(pixels)) > 1e-4
    cfg = model.config.vision["config"]
    assert (cfg["hidden_act"], cfg["num_attention_heads"], cfg["intermediate_size"]) == (act, HEADS, 48)
    assert model.embed_dim == EMBED_DIM and model.config.llm_dim == LLM_DIM
    assert model.preprocessing == ImagePreprocessing(16)  # OpenAI CLIP's, as the preprocess_cfg says
    provenance = json.loads((tmp_path / "kept" / "conversion.json").read_text())
    assert provenance["from"] == "open_clip" and provenance["kept_projection"]
    assert provenance["activation"] == {"act": act, "from": "model_cfg.quick_gelu"}
    # the pretrained logit scale is kept, as the official run keeps it (issue 27; test_official_recipe.py)
    assert "visual.proj" not in provenance["dropped"] and "logit_scale" not in provenance["dropped"]
    assert "transformer.resblocks.0.attn.in_proj_weight" in provenance["dropped"]  # the text tower's

    fresh = _convert(src, tmp_path / "fresh", "--embed-dim", "6", "--seed", "2")
    with torch.no_grad():
        assert _max_diff(fresh.vision(pixels), _pooled(visual, pixels)) <= 1e-5
    assert fresh.visual_projection.weight.shape == (6, 32)
    assert "visual.proj" in json.loads((tmp_path / "fresh" / "conversion.json").read_text())["dropped"]


def test_bare_state_dict_needs_heads_and_act(tmp_path, capsys):
    visual = _tower(True, seed=4)
    state = clip_state_dict(visual)
    # OpenAI's own checkpoints also carry these integers (OpenCLIP drops them)
    state.update({"input_resolution": torch.tensor(16), "context_length": torch.tensor(6),
                  "vocab_size": torch.tensor(40)})
    files = {"safetensors": tmp_path / "clip.safetensors", "bin": tmp_path / "clip.bin",
             "checkpoint": tmp_path / "epoch_3.pt"}
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["bin"])
    # an OpenCLIP training checkpoint: DDP's module. prefix, inside {"state_dict": ...}
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}},
               files["checkpoint"])
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = visual(pixels)
    for name, path in files.items():
        model = _convert(path, tmp_path / name, "--keep-projection", "--heads", str(HEADS),
                         "--act", "quick_gelu")
        with torch.no_grad():
            assert _max_diff(model.encode_image(pixels), expected) <= 1e-5, name
        assert model.preprocessing == ImagePreprocessing.default_for("clip", 16)
    base = ["--from", "open_clip", str(files["bin"]), "--out", str(tmp_path / "x"), "--llm-dim", "8",
            "--embed-dim", "4"]
    assert cli([*base, "--act", "gelu"]) == 2
    assert "pass --heads" in capsys.readouterr().err
    assert cli([*base, "--heads", "4"]) == 2
    assert "pass --act quick_gelu" in capsys.readouterr().err
    assert cli([*base, "--heads", "5", "--act", "gelu"]) == 2
    assert "5 attention heads do not divide the tower's width 32" in capsys.readouterr().err
    not_tensors = tmp_path / "bad.pt"
    torch.save({"visual.conv1.weight": [1, 2]}, not_tensors)
    assert cli(["--from", "open_clip", str(not_tensors), "--out", str(tmp_path / "y"), "--llm-dim", "8",
                "--embed-dim", "4", "--heads", "4", "--act", "gelu"]) == 5
    assert "not tensors" in capsys.readouterr().err
    assert cli(["--from", "open_clip", str(tmp_path / "nope.bin"), "--out", str(tmp_path / "y"), "--llm-dim",
                "8", "--embed-dim", "4"]) == 3
    (tmp_path / "empty").mkdir()
    assert cli(["--from", "open_clip", str(tmp_path / "empty"), "--out", str(tmp_path / "y"), "--llm-dim",
                "8", "--embed-dim", "4"]) == 3
    assert "has no open_clip_config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_activation_from_config_and_act_flag(tmp_path):
    visual = _tower(True, seed=5)
    state = clip_state_dict(visual)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = visual(pixels)
    # no quick_gelu flag: OpenCLIP builds GELU, and so do we unless --act says otherwise (force_quick_gelu)
    unflagged = _write_hub(tmp_path / "unflagged", state, _model_cfg(None))
    default = _convert(unflagged, tmp_path / "gelu", "--keep-projection")
    assert default.config.vision["config"]["hidden_act"] == "gelu"
    forced = _convert(unflagged, tmp_path / "forced", "--keep-projection", "--act", "quick_gelu")
    with torch.no_grad():
        assert _max_diff(forced.encode_image(pixels), expected) <= 1e-5
    assert json.loads((tmp_path / "forced" / "conversion.json").read_text())["activation"]["from"] == \
        "--act (model_cfg has no quick_gelu flag)"
    # ... but a name that says QuickGELU while the config says nothing needs --act to decide
    named = _write_hub(tmp_path / "ViT-B-16-quickgelu", state, _model_cfg(None))
    expected = r"no model_cfg.quick_gelu flag, .* the name 'ViT-B-16-quickgelu' says QuickGELU .*: state"
    with pytest.raises(ValueError, match=expected):
        main(["--from", "open_clip", str(named), "--out", str(tmp_path / "x"), "--llm-dim", "8",
              "--keep-projection"])
    assert _convert(named, tmp_path / "named", "--keep-projection", "--act", "quick_gelu").config.vision[
        "config"]["hidden_act"] == "quick_gelu"
    flagged = _write_hub(tmp_path / "flagged", state, _model_cfg(True))
    with pytest.raises(ValueError, match=r"--act gelu contradicts .*quick_gelu=True"):
        main(["--from", "open_clip", str(flagged), "--out", str(tmp_path / "x"), "--llm-dim", "8",
              "--keep-projection", "--act", "gelu"])
    with pytest.raises(ValueError, match=r"--heads 2 contradicts .*width 32 // head_width 8 = 4"):
        main(["--from", "open_clip", str(flagged), "--out", str(tmp_path / "x"), "--llm-dim", "8",
              "--keep-projection", "--heads", "2"])


def test_preprocess_cfg_is_carried(tmp_path):
    state = clip_state_dict(_tower(False, seed=6))
    pp = {"mean": [0.5, 0.5, 0.5], "std": 0.25, "interpolation": "bilinear", "resize_mode": "squash",
          "size": 999, "fill_color": 0}  # OpenCLIP takes the size from the tower
    src = _write_hub(tmp_path / "hub", state, _model_cfg(False), pp)
    model = _convert(src, tmp_path / "out", "--embed-dim", "4")
    assert model.preprocessing == ImagePreprocessing(16, (0.5,) * 3, (0.25,) * 3, "square", "bilinear")
    assert model.preprocessing.to_open_clip() == {"size": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
                                                  "interpolation": "bilinear", "resize_mode": "squash"}
    longest = _write_hub(tmp_path / "longest", state, _model_cfg(False), {"resize_mode": "longest"})
    with pytest.raises(SourceMismatchError, match="resize_mode 'longest' is not supported"):
        main(["--from", "open_clip", str(longest), "--out", str(tmp_path / "x"), "--llm-dim", "8",
              "--embed-dim", "4"])
    assert ImagePreprocessing.from_open_clip({"interpolation": "random"}, 32) == ImagePreprocessing(32)
    with pytest.raises(ValueError, match="cannot describe it"):
        ImagePreprocessing(32, resize_size=36).to_open_clip()


@pytest.mark.parametrize(("kind", "match"), [
    ("resnet", r"a ModifiedResNet image tower \(layers \[1, 1, 1, 1\]"),
    ("timm", r"a timm image tower \(timm_model_name 'vit_base_patch16_224', 2 visual.trunk.\* tensors\)"),
    ("attentional_pool", r"vision_cfg.attentional_pool=True"),
    ("layer_scale", r"vision_cfg.ls_init_value=0.1"),
    ("avg_pool", r"vision_cfg.pool_type='avg'"),
    ("unknown_field", r"fields OpenCLIP's CLIPVisionCfg does not have: \['rope'\]"),
    ("no_visual", r"no visual.\* tensors at all"),
])
def test_other_towers_are_refused_naming_what_was_found(tmp_path, capsys, kind, match):
    state = clip_state_dict(_tower(False, seed=7))
    vision_cfg = dict(VISION_CFG)
    if kind == "resnet":
        state = {k: v for k, v in state.items() if not k.startswith("visual.")}
        state.update({"visual.conv1.weight": torch.zeros(4, 3, 3, 3), "visual.layer1.0.conv1.weight":
                      torch.zeros(4, 4, 1, 1), "visual.attnpool.c_proj.weight": torch.zeros(12, 8)})
        vision_cfg = {"layers": [1, 1, 1, 1], "width": 8, "image_size": 16}
    elif kind == "timm":
        state = {k: v for k, v in state.items() if not k.startswith("visual.")}
        state.update({"visual.trunk.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
                      "visual.trunk.cls_token": torch.zeros(1, 1, 8),
                      "visual.head.proj.weight": torch.zeros(12, 8)})
        vision_cfg = {"timm_model_name": "vit_base_patch16_224", "timm_pool": "", "image_size": 16}
    elif kind == "attentional_pool":
        vision_cfg["attentional_pool"] = True
    elif kind == "layer_scale":
        vision_cfg["ls_init_value"] = 0.1
    elif kind == "avg_pool":
        vision_cfg["pool_type"] = "avg"
    elif kind == "unknown_field":
        vision_cfg["rope"] = True
    elif kind == "no_visual":
        state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    src = _write_hub(tmp_path / "hub", state, {"embed_dim": EMBED_DIM, "vision_cfg": vision_cfg})
    with pytest.raises(SourceMismatchError, match=match):
        main(["--from", "open_clip", str(src), "--out", str(tmp_path / "out"), "--llm-dim", "8",
              "--embed-dim", "4"])
    assert cli(["--from", "open_clip", str(src), "--out", str(tmp_path / "out"), "--llm-dim", "8",
                "--embed-dim", "4"]) == 5
    assert "not an OpenCLIP ViT image tower" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # without a config the tensors alone give the tower away
    if kind in ("resnet", "timm"):
        save_file(state, str(tmp_path / "bare.safetensors"))
        with pytest.raises(SourceMismatchError, match=match.split(r" \(")[0]):
            main(["--from", "open_clip", str(tmp_path / "bare.safetensors"), "--out", str(tmp_path / "out"),
                  "--llm-dim", "8", "--embed-dim", "4", "--heads", "2", "--act", "gelu"])


def _broken(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if kind == "unknown":
        state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # LayerScale, without a config
    elif kind == "missing":
        del state["visual.transformer.resblocks.1.ln_2.bias"]
    elif kind == "packed":
        state["visual.transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(90, 32)
    elif kind == "several":
        del state["visual.ln_pre.weight"]
        state["visual.attn_pool.query"] = torch.zeros(4, 32)
        state["visual.transformer.resblocks.0.mlp.c_proj.bias"] = torch.zeros(31)
    return state


@pytest.mark.parametrize(("kind", "match"), [
    ("unknown", r"unknown keys \(1\): visual.transformer.resblocks.0.ls_1.gamma"),
    ("missing", r"missing keys \(1\): visual.transformer.resblocks.1.ln_2.bias"),
    ("packed", r"visual.transformer.resblocks.1.attn.in_proj_weight\[q\] \(30, 32\) -> "
               r"vision.model.\S*encoder.layers.1.self_attn.q_proj.weight expects \(32, 32\)"),
    ("several", r"unknown keys \(1\): visual.attn_pool.query; missing keys \(1\): visual.ln_pre.weight; "
                r"shape mismatches \(1\): visual.transformer.resblocks.0.mlp.c_proj.bias \(31,\)"),
])
def test_strict_mapping_lists_every_problem(tmp_path, kind, match):
    state = _broken(clip_state_dict(_tower(False, seed=8)), kind)
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(SourceMismatchError, match=match):
        main(["--from", "open_clip", str(tmp_path / "clip.safetensors"), "--out", str(tmp_path / "out"),
              "--llm-dim", "8", "--embed-dim", "4", "--heads", "4", "--act", "gelu"])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_config_must_describe_the_tensors(tmp_path):
    state = clip_state_dict(_tower(False, seed=9))
    src = _write_hub(tmp_path / "hub", state, {"embed_dim": 10, "quick_gelu": False,
                                               "vision_cfg": {**VISION_CFG, "layers": 3, "mlp_ratio": 4.0}})
    expected = (r"does not describe its tensors: layers 3 \(tensors: 2\), mlp_width 128 \(tensors: 48\), "
                r"embed_dim 10 \(tensors: 12\)")
    with pytest.raises(SourceMismatchError, match=expected):
        main(["--from", "open_clip", str(src), "--out", str(tmp_path / "out"), "--llm-dim", "8",
              "--embed-dim", "4"])
    with pytest.raises(ValueError, match="outputs 12 features but --embed-dim is 4"):
        main(["--from", "open_clip", str(_write_hub(tmp_path / "ok", state, _model_cfg(False))), "--out",
              str(tmp_path / "out"), "--llm-dim", "8", "--embed-dim", "4", "--keep-projection"])
    no_proj = {k: v for k, v in state.items() if k != "visual.proj"}
    src = _write_hub(tmp_path / "no_proj", no_proj, _model_cfg(False))
    with pytest.raises(SourceMismatchError, match=r"--keep-projection: .* has no visual.proj"):
        main(["--from", "open_clip", str(src), "--out", str(tmp_path / "out"), "--llm-dim", "8",
              "--keep-projection"])
    assert _convert(src, tmp_path / "out", "--embed-dim", "4").embed_dim == 4


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_round_trip_open_clip_ours_open_clip(tmp_path, act):
    visual = _tower(ACTS[act], seed=10)
    state = clip_state_dict(visual)
    pp = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bicubic",
          "resize_mode": "squash"}
    model_cfg = {**_model_cfg(ACTS[act]), "vision_cfg": {**VISION_CFG, "norm_kwargs": {"eps": 1e-6}}}
    src = _write_hub(tmp_path / "hub", state, model_cfg, pp)
    ours = _convert(src, tmp_path / "ours", "--keep-projection")
    assert ours.config.vision["config"]["layer_norm_eps"] == 1e-6
    out = tmp_path / "back" / "open_clip_model.safetensors"
    assert main(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(out)]) == 0

    back = load_file(str(out))
    visual_keys = sorted(k for k in state if k.startswith("visual."))
    assert sorted(back) == sorted([*visual_keys, "logit_scale"])
    for k in visual_keys:
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    assert torch.equal(back["logit_scale"], ours.logit_scale.detach())
    config = json.loads((out.parent / "open_clip_config.json").read_text())
    assert config["model_cfg"] == {"embed_dim": EMBED_DIM, "quick_gelu": ACTS[act],
                                   "vision_cfg": {**VISION_CFG, "norm_kwargs": {"eps": 1e-6}}}
    assert config["preprocess_cfg"] == {**pp, "size": 16}

    # OpenCLIP-style code loads the vision side from these files and computes the same features
    rebuilt = build_vision_tower(config["model_cfg"]["embed_dim"], config["model_cfg"]["vision_cfg"],
                                 config["model_cfg"]["quick_gelu"]).eval()
    rebuilt.load_state_dict({k.removeprefix("visual."): v for k, v in back.items()
                             if k.startswith("visual.")})
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _max_diff(rebuilt(pixels), ours.encode_image(pixels)) <= 1e-5
    # and the written folder is an OpenCLIP hub folder that converts again to the same tower
    again = _convert(out.parent, tmp_path / "again", "--keep-projection")
    assert again.preprocessing == ours.preprocessing
    vision_side = [k for k in again.state_dict() if k.startswith(("vision.", "visual_projection."))]
    assert all(torch.equal(again.state_dict()[k], ours.state_dict()[k]) for k in vision_side)


def test_export_options_overwrite_and_errors(tmp_path, capsys):
    src = _write_hub(tmp_path / "hub", clip_state_dict(_tower(False, seed=11)), _model_cfg(False))
    _convert(src, tmp_path / "ours", "--keep-projection", "--loss", "siglip")
    out = tmp_path / "exp" / "vision.safetensors"
    assert cli(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(out), "--dtype", "float16"]) == 0
    back = load_file(str(out))
    assert {v.dtype for v in back.values()} == {torch.float16}
    assert "logit_bias" in back
    config = json.loads((out.parent / "open_clip_config.json").read_text())
    assert config["model_cfg"]["init_logit_bias"] == pytest.approx(-10.0)
    assert cli(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(out)]) == 4
    with pytest.raises(OutputExistsError, match="--overwrite"):
        main(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(out)])
    assert cli(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(out), "--overwrite"]) == 0
    assert {v.dtype for v in load_file(str(out)).values()} == {torch.float32}
    assert sorted(p.name for p in out.parent.iterdir()) == ["open_clip_config.json", "vision.safetensors"]
    capsys.readouterr()
    assert cli(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(tmp_path / "x.bin")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert cli(["--to", "open_clip", str(tmp_path / "ours"), "--out", str(tmp_path / "y.safetensors"),
                "--llm-dim", "8"]) == 2
    assert "--llm-dim only apply to imports" in capsys.readouterr().err
    assert cli(["--to", "open_clip", str(tmp_path / "nope"), "--out", str(tmp_path / "y.safetensors")]) == 3
    with pytest.raises(SystemExit) as exc:
        cli(["--from", "open_clip", "--to", "open_clip", str(src), "--out", str(tmp_path / "z")])
    assert exc.value.code == 2
    assert cli(["--from", "hf-clip", str(src), "--out", str(tmp_path / "z"), "--llm-dim", "8",
                "--embed-dim", "4", "--act", "gelu"]) == 2
    assert "--act only apply to --from open_clip" in capsys.readouterr().err


def test_export_refuses_towers_open_clip_cannot_build(tmp_path):
    from llm2clip_fast.convert.open_clip_export import open_clip_export
    from llm2clip_fast.models.llm2clip import LLM2CLIPConfig

    sizes = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 48}
    vit = {"kind": "vit", "config": sizes}
    with pytest.raises(ValueError, match="'vit' tower"):
        open_clip_export(LLM2CLIPModel(LLM2CLIPConfig(vision=vit, embed_dim=8, llm_dim=8)))
    clip = {"kind": "clip", "config": {**sizes, "hidden_act": "gelu_new"}}
    with pytest.raises(ValueError, match="activation 'gelu_new' has no OpenCLIP equivalent"):
        open_clip_export(LLM2CLIPModel(LLM2CLIPConfig(vision=clip, embed_dim=8, llm_dim=8)))


def test_mlp_ratio_round_trips_openclip_sizing():
    from llm2clip_fast.convert.open_clip_keys import mlp_ratio_for

    for width, mlp_width in ((1664, 8192), (1408, 6144), (1280, 5120), (32, 48), (7, 10)):
        ratio = mlp_ratio_for(width, mlp_width)
        assert int(width * ratio) == mlp_width


def test_stage2_starts_from_a_converted_open_clip_model(tmp_path):
    from _stage2_runs import DIM, make_demo

    from llm2clip_fast.train.__main__ import main as train_main

    demo = make_demo(tmp_path / "demo")
    visual = _tower(True, seed=12, vision_cfg={**VISION_CFG, "image_size": 32})
    src = _write_hub(tmp_path / "hub", clip_state_dict(visual),
                     {**_model_cfg(True), "vision_cfg": {**VISION_CFG, "image_size": 32}},
                     {"mean": [0.5] * 3, "std": [0.5] * 3})
    converted = _convert(src, tmp_path / "converted", "--keep-projection", "--adapter-blocks", "1",
                         llm_dim=DIM)
    run = tmp_path / "run"
    assert train_main(["stage2", "--init-model", str(tmp_path / "converted"),
                       "--embeddings", str(demo["cache"]), "--data", str(demo["data"]), "--out", str(run),
                       "--batch-size", "8", "--steps", "2", "--num-workers", "0", "--no-progress",
                       "--lr", "1e-3"]) == 0
    trained = LLM2CLIPModel.from_pretrained(run / "model")
    assert trained.preprocessing == converted.preprocessing  # the tower's preprocessing goes along
    assert trained.config.vision["config"]["hidden_act"] == "quick_gelu"
    assert not torch.equal(trained.visual_projection.weight, converted.visual_projection.weight)


def test_dtype_is_kept_unless_asked(tmp_path):
    state = {k: v.half() for k, v in clip_state_dict(_tower(False, seed=13)).items()}
    src = _write_hub(tmp_path / "hub", state, _model_cfg(False))
    half = _convert(src, tmp_path / "half", "--keep-projection")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert torch.equal(half.visual_projection.weight, state["visual.proj"].T)
    full = _convert(src, tmp_path / "full", "--keep-projection", "--dtype", "float32")
    assert {p.dtype for p in full.parameters()} == {torch.float32}
