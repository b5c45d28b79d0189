"""Stage 2 ``--keep-projection``: start from a pretrained transformers CLIP folder's visual_projection
when its output size equals ``--embed-dim`` (an error otherwise); the default re-initialises it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _stage2_runs import DIM, final_state, make_demo, stage2_args
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

from llm2clip_fast.convert.errors import SourceMismatchError
from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import main as train_main
from llm2clip_fast.train.__main__ import parse_args

VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 2}
PROJ = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keep_projection")
    torch.manual_seed(0)
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 50, "max_position_embeddings": 8}
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=PROJ)).save_pretrained(
        root / "clip")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "tower")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2), add_pooling_layer=False).save_pretrained(root / "vit")
    return {"clip": root / "clip", "tower": root / "tower", "vit": root / "vit"}


def _pretrained_projection(folder: Path) -> torch.Tensor:
    return CLIPModel.from_pretrained(folder).visual_projection.weight.detach()


def _args(folder: Path, *extra: str):
    args = parse_args(["stage2", "--data", "d", "--out", "o", "--embeddings", "c",
                       "--vision-path", str(folder), "--embed-dim", str(PROJ), *extra])
    stage2.resolve_recipe(args, stage2.STAGE2_RECIPES)
    return args


def test_build_model_keeps_the_projection_only_when_asked(folders):
    want = _pretrained_projection(folders["clip"])
    torch.manual_seed(0)
    kept = stage2.build_model(_args(folders["clip"], "--keep-projection"), DIM, {})
    assert torch.equal(kept.visual_projection.weight, want)
    torch.manual_seed(0)
    fresh = stage2.build_model(_args(folders["clip"]), DIM, {})
    assert fresh.visual_projection.weight.shape == want.shape
    assert not torch.allclose(fresh.visual_projection.weight, want)
    # The rest of the model is built identically (the copy draws nothing from the RNG).
    assert torch.equal(kept.text_adapter.proj.weight, fresh.text_adapter.proj.weight)
    assert all(torch.equal(a, b) for a, b in zip(kept.vision.state_dict().values(),
                                                 fresh.vision.state_dict().values()))


@pytest.mark.parametrize("case, match, error", [
    ("size", rf"--keep-projection: the pretrained projection outputs {PROJ} features but --embed-dim is 8",
     ValueError),
    ("recipe", rf"outputs {PROJ} features but --embed-dim is 1280", ValueError),
    ("tower", r"--keep-projection: .*tower has no visual_projection\.weight", SourceMismatchError),
    ("vit", r"--keep-projection: .*vit holds a 'vit' model, which has no visual_projection", ValueError),
])
def test_build_model_refuses_projections_it_cannot_keep(folders, case, match, error):
    if case == "size":
        args = _args(folders["clip"], "--keep-projection", "--embed-dim", "8")
    elif case == "recipe":
        args = parse_args(["stage2", "--data", "d", "--out", "o", "--embeddings", "c", "--recipe", "llm2clip",
                           "--vision-path", str(folders["clip"]), "--keep-projection"])
        stage2.resolve_recipe(args, stage2.STAGE2_RECIPES)
    else:
        args = _args(folders[case], "--keep-projection")
    with pytest.raises(error, match=match):
        stage2.build_model(args, DIM, {})


def test_stage2_run_with_keep_projection(folders, tmp_path):
    demo = make_demo(tmp_path / "demo")
    out = tmp_path / "run"
    argv = stage2_args(demo, out, "--keep-projection", "--save-every", "0", steps=2)
    i = argv.index("--vision-preset")
    argv[i:i + 2] = ["--vision-path", str(folders["clip"])]
    assert train_main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["keep_projection"] is True and saved["model"]["embed_dim"] == PROJ
    # Two Adam steps at lr 2e-3 move each weight by about 4e-3: the run started from the pretrained one.
    moved = (final_state(out)["visual_projection.weight"] - _pretrained_projection(folders["clip"])).abs()
    assert 0 < moved.max() < 0.01

    bad = stage2_args(demo, tmp_path / "bad", "--keep-projection")
    with pytest.raises(ValueError, match=r"needs --vision-path \(a preset tower has none"):
        train_main(bad)
    assert not (tmp_path / "bad").exists()
