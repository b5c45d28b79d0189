"""``python -m llm2clip_fast.convert``: tiny source folders with the official key names, converted, loaded
and compared against the source models (the official adapter transcription, transformers' CLIP towers)."""

from __future__ import annotations

import json

import pytest
import torch
from _llm2clip_official_reference import TextProj
from _llm2clip_release import (
    BLOCKS,
    EMBED_DIM,
    LLM_DIM,
    VISION,
    _perturb,
    _release_parts,
    _release_state,
    _write_release,
)
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from llm2clip_fast.convert.__main__ import cli, main
from llm2clip_fast.convert.errors import OutputExistsError, SourceMismatchError
from llm2clip_fast.models.llm2clip import LLM2CLIPModel


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# None: the default, l2 since issue 27 (the official training code's TextProj.forward(l2_norm=True))
@pytest.mark.parametrize("input_norm", [None, "none"])
@pytest.mark.parametrize("shards", [1, 3])
def test_llm2clip_hf_release_matches_the_official_forward(tmp_path, input_norm, shards):
    tower, projection, adapter, logit_scale = _release_parts()
    state = _release_state(tower, projection, adapter, logit_scale)
    src = _write_release(tmp_path / "release", state, shards)
    out = tmp_path / "converted"
    argv = ["--from", "llm2clip-hf", str(src), "--out", str(out)]
    assert main(argv + (["--input-norm", input_norm] if input_norm else [])) == 0

    model = LLM2CLIPModel.from_pretrained(out).eval()
    assert model.config.adapter == {"num_blocks": BLOCKS, "expansion": 2, "dropout": 0.0,
                                    "input_norm": input_norm or "l2"}
    torch.manual_seed(5)
    llm = 4.0 * torch.randn(7, LLM_DIM)  # norm far from 1, so a wrong input normalisation shows
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected_text = adapter(llm, l2_norm=(input_norm or "l2") == "l2")
        expected_image = projection(tower(pixel_values=pixels).pooler_output)
        # 1e-5: the adapter runs on the lean backend's C++ kernels, which round fp32 differently from
        # torch's LayerNorm/GELU (a mapping error would be orders of magnitude larger).
        assert _max_diff(model.encode_text(llm), expected_text) <= 1e-5
        assert _max_diff(model.encode_image(pixels), expected_image) <= 1e-6
        other = adapter(llm, l2_norm=(input_norm or "l2") != "l2")
        assert _max_diff(model.encode_text(llm), other) > 1e-3
    assert model.logit_scale.item() == logit_scale.item()
    provenance = json.loads((out / "conversion.json").read_text())
    assert provenance["from"] == "llm2clip-hf" and provenance["dropped"] == []
    assert provenance["adapter_input_norm"] == (input_norm or "l2")


def test_dtype_is_kept_unless_asked(tmp_path):
    state = {k: v.half() for k, v in _release_state(*_release_parts()).items()}
    src = _write_release(tmp_path / "release", state)
    main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "half")])
    half = LLM2CLIPModel.from_pretrained(tmp_path / "half")
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert torch.equal(half.text_adapter.proj.weight, state["text_adapter.adaptor.4.weight"])
    main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "full"), "--dtype", "float32"])
    full = LLM2CLIPModel.from_pretrained(tmp_path / "full")
    assert {p.dtype for p in full.parameters()} == {torch.float32}


def test_old_position_ids_buffer_is_checked_then_dropped(tmp_path):
    state = _release_state(*_release_parts())
    state["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    src = _write_release(tmp_path / "ok", state)
    main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "out")])
    provenance = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert provenance["dropped"] == ["vision_model.embeddings.position_ids"]
    state["vision_model.embeddings.position_ids"] = torch.tensor([[0, 2, 1, 3, 4]])
    bad = _write_release(tmp_path / "bad", state)
    with pytest.raises(SourceMismatchError, match="not arange"):
        main(["--from", "llm2clip-hf", str(bad), "--out", str(tmp_path / "out2")])


def _broken(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    state = dict(state)
    if kind == "unknown":
        state["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 4)
    elif kind == "missing":
        del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    elif kind == "shape":
        state["text_adapter.adaptor.1.fn.3.weight"] = torch.zeros(LLM_DIM, LLM_DIM)
    elif kind == "layout":
        state["text_adapter.adaptor.7.weight"] = torch.zeros(3)
    return state


@pytest.mark.parametrize(("kind", "match"), [
    ("unknown", r"unknown keys \(1\): text_model.embeddings.token_embedding.weight"),
    ("missing", r"missing keys \(1\): vision_model.encoder.layers.1.mlp.fc2.bias"),
    ("shape", r"text_adapter.adaptor.1.fn.3.weight \(24, 24\) -> text_adapter.blocks.1.fc2.weight "
              r"expects \(24, 48\)"),
    ("layout", r"head modules at \[3, 4, 7\]"),
])
def test_strict_mapping_lists_every_problem(tmp_path, capsys, kind, match):
    src = _write_release(tmp_path / "release", _broken(_release_state(*_release_parts()), kind))
    out = tmp_path / "out"
    with pytest.raises(SourceMismatchError, match=match):
        main(["--from", "llm2clip-hf", str(src), "--out", str(out)])
    assert cli(["--from", "llm2clip-hf", str(src), "--out", str(out)]) == 5
    assert "llm2clip_fast.convert: error:" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_cli_exit_codes_and_overwrite(tmp_path, capsys):
    src = _write_release(tmp_path / "release", _release_state(*_release_parts()))
    out = tmp_path / "out"
    assert cli(["--from", "llm2clip-hf", str(tmp_path / "nope"), "--out", str(out)]) == 3
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"vision_config": VISION}))
    (pickled / "pytorch_model.bin").write_bytes(b"")
    assert cli(["--from", "llm2clip-hf", str(pickled), "--out", str(out)]) == 3
    assert "pickled weights ['pytorch_model.bin']" in capsys.readouterr().err
    assert cli(["--from", "llm2clip-hf", str(src), "--out", str(out), "--llm-dim", "8"]) == 2
    assert cli(["--from", "llm2clip-hf", str(src), "--out", str(out), "--llm", "models/cc-llama"]) == 0
    # with LLM2CLIP's caption encoding, which the release's adapter was trained on (issue 27, item 4)
    assert LLM2CLIPModel.from_pretrained(out).config.llm == {"path": "models/cc-llama", "max_length": 512,
                                                             "doc_max_length": 512, "template": "llm2clip"}
    before = (out / "model.safetensors").read_bytes()
    assert cli(["--from", "llm2clip-hf", str(src), "--out", str(out)]) == 4
    with pytest.raises(OutputExistsError, match="--overwrite"):
        main(["--from", "llm2clip-hf", str(src), "--out", str(out)])
    assert cli(["--from", "llm2clip-hf", str(src), "--out", str(out), "--overwrite",
                "--dtype", "float16"]) == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pickled", "release"]
    config = json.loads((src / "config.json").read_text())
    config["vision_config"]["model_type"] = "eva_vision_model"
    (src / "config.json").write_text(json.dumps(config))
    assert cli(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "eva")]) == 5
    assert "'eva_vision_model' vision tower" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli(["--from", "timm", str(src), "--out", str(out)])
    assert exc.value.code == 2


def _clip_parts(seed: int = 1):
    torch.manual_seed(seed)
    config = CLIPConfig(vision_config=VISION,
                        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 50,
                                     "max_position_embeddings": 8},
                        projection_dim=EMBED_DIM)
    clip = CLIPModel(config).eval()
    _perturb(clip, seed + 3)
    return clip


def test_hf_clip_keeps_the_tower_and_optionally_the_projection(tmp_path):
    clip = _clip_parts()
    clip.save_pretrained(tmp_path / "clip")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected_pooled = clip.vision_model(pixel_values=pixels).pooler_output
        expected_image = clip.visual_projection(expected_pooled)

    main(["--from", "hf-clip", str(tmp_path / "clip"), "--out", str(tmp_path / "kept"), "--llm-dim", "12",
          "--keep-projection"])
    kept = LLM2CLIPModel.from_pretrained(tmp_path / "kept").eval()
    assert kept.embed_dim == EMBED_DIM and kept.config.llm_dim == 12
    with torch.no_grad():
        assert _max_diff(kept.encode_image(pixels), expected_image) <= 1e-6
        assert kept.encode_text(torch.randn(3, 12)).shape == (3, EMBED_DIM)
    provenance = json.loads((tmp_path / "kept" / "conversion.json").read_text())
    assert "text_projection.weight" in provenance["dropped"]
    # the pretrained logit scale is kept, as the official run keeps it (issue 27; test_official_recipe.py)
    assert "logit_scale" not in provenance["dropped"] and kept.logit_scale.item() == clip.logit_scale.item()
    assert "visual_projection.weight" not in provenance["fresh"]

    main(["--from", "hf-clip", str(tmp_path / "clip"), "--out", str(tmp_path / "fresh"), "--llm-dim", "12",
          "--embed-dim", "16", "--seed", "3"])
    fresh = LLM2CLIPModel.from_pretrained(tmp_path / "fresh").eval()
    with torch.no_grad():
        assert _max_diff(fresh.vision(pixels), expected_pooled) <= 1e-6
    assert fresh.visual_projection.weight.shape == (16, VISION["hidden_size"])
    assert fresh.config.adapter["input_norm"] == "l2"

    with pytest.raises(ValueError, match="outputs 20 features but --embed-dim is 16"):
        main(["--from", "hf-clip", str(tmp_path / "clip"), "--out", str(tmp_path / "x"), "--llm-dim", "12",
              "--embed-dim", "16", "--keep-projection"])
    with pytest.raises(ValueError, match="--embed-dim is needed"):
        main(["--from", "hf-clip", str(tmp_path / "clip"), "--out", str(tmp_path / "x"), "--llm-dim", "12"])
    assert cli(["--from", "hf-clip", str(tmp_path / "clip"), "--out", str(tmp_path / "x")]) == 2


def test_hf_clip_vision_only_folder(tmp_path):
    torch.manual_seed(2)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    _perturb(tower, 4)
    tower.save_pretrained(tmp_path / "tower")
    main(["--from", "hf-clip", str(tmp_path / "tower"), "--out", str(tmp_path / "out"), "--llm-dim", "12",
          "--embed-dim", "8"])
    model = LLM2CLIPModel.from_pretrained(tmp_path / "out").eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _max_diff(model.vision(pixels), tower(pixel_values=pixels).pooler_output) <= 1e-6
    with pytest.raises(SourceMismatchError, match=r"has no visual_projection\.weight"):
        main(["--from", "hf-clip", str(tmp_path / "tower"), "--out", str(tmp_path / "x"), "--llm-dim", "12",
              "--keep-projection"])
    # A CLIP text tower in a vision-only folder is not expected there: strict.
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "tower" / "model.safetensors"))
    state["text_model.final_layer_norm.weight"] = torch.ones(4)
    save_file(state, str(tmp_path / "tower" / "model.safetensors"))
    with pytest.raises(SourceMismatchError, match="unknown keys"):
        main(["--from", "hf-clip", str(tmp_path / "tower"), "--out", str(tmp_path / "y"), "--llm-dim", "12",
              "--embed-dim", "8"])


def test_from_pretrained_reads_the_local_hub_cache_and_points_releases_to_convert(tmp_path, monkeypatch):
    import huggingface_hub.constants

    src = _write_release(tmp_path / "release", _release_state(*_release_parts()))
    with pytest.raises(ValueError, match="convert it first"):
        LLM2CLIPModel.from_pretrained(src)
    main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "out")])
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llm2clip" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (snapshot / f).write_bytes((tmp_path / "out" / f).read_bytes())
    (cache / "models--someone--tiny-llm2clip" / "refs").mkdir()
    (cache / "models--someone--tiny-llm2clip" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cached = LLM2CLIPModel.from_pretrained("someone/tiny-llm2clip")
    local = LLM2CLIPModel.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(cached.state_dict().values(), local.state_dict().values(),
                                                 strict=True))
    with pytest.raises(FileNotFoundError, match="nor in the local Hugging Face cache"):
        LLM2CLIPModel.from_pretrained("someone/not-cached")


def test_stage2_continues_from_a_converted_release(tmp_path):
    from _stage2_runs import DIM, make_demo

    from llm2clip_fast.train.__main__ import main as train_main

    assert DIM == LLM_DIM
    demo = make_demo(tmp_path / "demo")
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**{**VISION, "image_size": 32})).eval()
    projection = torch.nn.Linear(VISION["hidden_size"], EMBED_DIM, bias=False)
    adapter = TextProj(embedding_dim=LLM_DIM, output_dim=EMBED_DIM, num_layers_text=BLOCKS)
    state = _release_state(tower, projection, adapter, torch.tensor(3.0))
    src = _write_release(tmp_path / "release", state)
    config = json.loads((src / "config.json").read_text())
    config["vision_config"]["image_size"] = 32
    (src / "config.json").write_text(json.dumps(config))
    main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "converted")])
    run = tmp_path / "run"
    assert train_main(["stage2", "--init-model", str(tmp_path / "converted"),
                       "--embeddings", str(demo["cache"]), "--data", str(demo["data"]), "--out", str(run),
                       "--batch-size", "8", "--steps", "2", "--num-workers", "0", "--no-progress",
                       "--lr", "1e-3"]) == 0
    trained = LLM2CLIPModel.from_pretrained(run / "model")
    assert trained.config.adapter["input_norm"] == "l2"  # the default since issue 27
    before = state["text_adapter.adaptor.0.fn.0.weight"]
    assert not torch.equal(trained.text_adapter.blocks[0].fc1.weight, before)
