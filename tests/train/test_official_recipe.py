"""The official LLM2CLIP recipe, item by item (issue 27), against transcriptions of microsoft/LLM2CLIP at
commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a (``_llm2clip_training_reference``) and llm2vec 0.2.3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _llm2clip_training_reference import load_checkpoint
from _stage2_runs import make_demo, stage2_args
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from llm2clip_fast.convert.__main__ import main as convert_main
from llm2clip_fast.models.llm2clip import LLM2CLIPModel
from llm2clip_fast.train.__main__ import main as train_main

VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 16, "patch_size": 8, "hidden_act": "quick_gelu", "projection_dim": 20}
NEW_SCALE = math.log(1 / 0.07)


def _clip_folder(folder: Path, logit_scale: float) -> Path:
    torch.manual_seed(0)
    config = CLIPConfig(vision_config=VISION,
                        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 50,
                                     "max_position_embeddings": 8},
                        projection_dim=20)
    clip = CLIPModel(config).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(logit_scale)
    clip.save_pretrained(folder)
    return folder


# -- item 1: the pretrained logit scale -------------------------------------------------------------------

def test_official_load_checkpoint_keeps_the_pretrained_logit_scale():
    """What the transcription shows: text.* and visual.head.* go, logit_scale stays (also when an older
    layout keeps it as text.logit_scale)."""
    state = {"visual.blocks.0.attn.q_bias": torch.ones(2), "visual.head.weight": torch.ones(3, 2),
             "text.transformer.w": torch.ones(1), "logit_scale": torch.tensor(4.6052),
             "visual.rope.freqs_cos": torch.ones(1)}
    kept = load_checkpoint(True, dict(state))
    assert sorted(kept) == ["logit_scale", "visual.blocks.0.attn.q_bias", "visual.blocks.0.attn.q_proj.bias"]
    assert float(kept["logit_scale"]) == pytest.approx(4.6052)
    old = {"visual.pos_embed": torch.ones(1), "text.logit_scale": torch.tensor(4.5)}
    assert float(load_checkpoint(True, old)["logit_scale"]) == 4.5


def test_hf_clip_and_open_clip_conversions_keep_the_pretrained_logit_scale(tmp_path, capsys):
    src = _clip_folder(tmp_path / "clip", 4.5)
    convert_main(["--from", "hf-clip", str(src), "--out", str(tmp_path / "kept"), "--llm-dim", "12",
                  "--embed-dim", "8"])
    kept = LLM2CLIPModel.from_pretrained(tmp_path / "kept")
    official = load_checkpoint(True, {"logit_scale": torch.tensor(4.5), "text.w": torch.ones(1)})
    assert kept.logit_scale.item() == float(official["logit_scale"]) == 4.5
    provenance = json.loads((tmp_path / "kept" / "conversion.json").read_text())
    assert "logit_scale" not in provenance["dropped"] and "logit_scale" not in provenance["fresh"]
    assert "kept" in provenance["logit_scale"] and "logit scale kept" in capsys.readouterr().out

    convert_main(["--from", "hf-clip", str(src), "--out", str(tmp_path / "new"), "--llm-dim", "12",
                  "--embed-dim", "8", "--logit-scale-init", "new"])
    assert LLM2CLIPModel.from_pretrained(tmp_path / "new").logit_scale.item() == pytest.approx(NEW_SCALE)

    tower = CLIPVisionModel(CLIPVisionConfig(**VISION))
    tower.save_pretrained(tmp_path / "tower")
    convert_main(["--from", "hf-clip", str(tmp_path / "tower"), "--out", str(tmp_path / "vo"),
                  "--llm-dim", "12", "--embed-dim", "8"])
    assert LLM2CLIPModel.from_pretrained(tmp_path / "vo").logit_scale.item() == pytest.approx(NEW_SCALE)
    why = json.loads((tmp_path / "vo" / "conversion.json").read_text())["logit_scale"]
    assert "holds no logit_scale" in why

    # an OpenCLIP state dict (the transcription-tested layout of test_convert_open_clip)
    from _open_clip_reference import clip_state_dict
    from _open_clip_tower import _tower

    state = clip_state_dict(_tower(True))
    state["logit_scale"] = torch.tensor(4.25)
    save_file(state, str(tmp_path / "oc.safetensors"))
    convert_main(["--from", "open_clip", str(tmp_path / "oc.safetensors"), "--out", str(tmp_path / "oc"),
                  "--llm-dim", "12", "--embed-dim", "8", "--heads", "4", "--act", "quick_gelu"])
    assert LLM2CLIPModel.from_pretrained(tmp_path / "oc").logit_scale.item() == 4.25
    # under the SigLIP loss a CLIP scale means nothing: new values, said why
    convert_main(["--from", "open_clip", str(tmp_path / "oc.safetensors"), "--out", str(tmp_path / "sig"),
                  "--llm-dim", "12", "--embed-dim", "8", "--heads", "4", "--act", "quick_gelu",
                  "--loss", "siglip"])
    sig = LLM2CLIPModel.from_pretrained(tmp_path / "sig")
    assert sig.logit_scale.item() == pytest.approx(math.log(10)) and sig.logit_bias.item() == -10
    assert "CLIP's" in json.loads((tmp_path / "sig" / "conversion.json").read_text())["logit_scale"]


def test_stage2_vision_path_starts_at_the_folder_logit_scale(tmp_path):
    demo = make_demo(tmp_path / "demo")
    src = _clip_folder(tmp_path / "clip", 4.5)

    def first_scale(out: Path, *extra: str) -> float:
        argv = [a for a in stage2_args(demo, out, "--steps", "1", *extra) if a != "--vision-preset"]
        argv.remove("micro")
        assert train_main([*argv, "--vision-path", str(src), "--lr", "1e-6"]) == 0
        record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        return math.log(record["logit_scale"])

    assert first_scale(tmp_path / "kept") == pytest.approx(4.5, abs=1e-4)
    assert first_scale(tmp_path / "new", "--logit-scale-init", "new") == pytest.approx(NEW_SCALE, abs=1e-4)


# -- item 2: the release's adapter input normalisation ------------------------------------------------------

def test_llm2clip_hf_defaults_to_the_training_codes_l2_and_says_so(tmp_path, capsys, caplog):
    """The training code normalises (TextProj.forward(l2_norm=True), official transcription in
    _llm2clip_official_reference); the default follows it, records it as an assumption, and the
    conversion and eval say so."""
    from _llm2clip_official_reference import TextProj
    from _llm2clip_release import _release_parts, _release_state, _write_release

    from llm2clip_fast.convert.input_norm_notice import warn_if_input_norm_assumed

    tower, projection, adapter, scale = _release_parts()
    src = _write_release(tmp_path / "release", _release_state(tower, projection, adapter, scale))
    convert_main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "default")])
    assert "could not be read to confirm it" in capsys.readouterr().err
    model = LLM2CLIPModel.from_pretrained(tmp_path / "default").eval()
    llm = 3.0 * torch.randn(4, adapter.embedding_dim)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(llm), adapter(llm), atol=1e-6)  # TextProj's default l2_norm
    assert isinstance(adapter, TextProj)
    record = json.loads((tmp_path / "default" / "conversion.json").read_text())
    assert record["adapter_input_norm"] == "l2" and record["adapter_input_norm_from"].startswith("default")
    with caplog.at_level("WARNING"):
        assert "--input-norm none" in warn_if_input_norm_assumed(tmp_path / "default")
    # eval says it before anything else (here the data is missing, so it stops right after)
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        train_main(["eval", "--model", str(tmp_path / "default"), "--data", str(tmp_path / "missing.csv")])
    assert any("could not be read to confirm it" in r.getMessage() for r in caplog.records)

    capsys.readouterr()
    convert_main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "none"), "--input-norm", "none"])
    assert "confirm" not in capsys.readouterr().err
    assert warn_if_input_norm_assumed(tmp_path / "none") is None


# -- item 3: starting where run.sh starts (a plain EVA-CLIP checkpoint) ----------------------------------

def _plain_eva_clip(seed: int = 0):
    """A tiny pretrained EVA-CLIP as baaivision ships it: visual.* (q_bias/v_bias, a CLIP head of 12), a
    CLIP text tower under text.*, the RoPE tables and a trained logit_scale."""
    from _eva_clip_checkpoint import TINY
    from _eva_clip_reference import build_visual

    torch.manual_seed(seed)
    visual = build_visual(12, TINY["vision_cfg"]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state = {k.replace("attn.q_proj.bias", "attn.q_bias").replace("attn.v_proj.bias", "attn.v_bias"): v
             for k, v in state.items()}
    state.update({"text.token_embedding.weight": torch.randn(40, 16),
                  "text.positional_embedding": torch.randn(6, 16),
                  "text.transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16),
                  "text.ln_final.weight": torch.ones(16), "text.text_projection": torch.randn(16, 12),
                  "logit_scale": torch.tensor(4.6052)})
    return visual, {k: v.detach().clone().contiguous() for k, v in state.items()}


def test_plain_eva_clip_converts_as_the_official_load_checkpoint_loads_it(tmp_path, capsys):
    from _eva_clip_checkpoint import TINY, _config_file
    from _llm2clip_official_reference import TextProj
    from _llm2clip_training_reference import init_head
    from _timm_environment import require_timm

    require_timm()
    visual, state = _plain_eva_clip()
    src = tmp_path / "EVA02_CLIP_tiny.pt"
    torch.save({"module": state}, src)
    cfg = _config_file(tmp_path, TINY)  # embed_dim 20: the LLM2CLIP config's size, not the file's head (12)
    convert_main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "m"), "--model-config", cfg,
                  "--llm-dim", "24", "--seed", "3"])
    assert "logit scale kept" in capsys.readouterr().out
    model = LLM2CLIPModel.from_pretrained(tmp_path / "m").eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model.vision(pixels) - visual.forward_features(pixels)).abs().max() <= 1e-5
    official = load_checkpoint(True, dict(state))
    assert model.logit_scale.item() == pytest.approx(float(official["logit_scale"]))
    record = json.loads((tmp_path / "m" / "conversion.json").read_text())
    # exactly what load_checkpoint deletes (text*, visual.head*) and the RoPE tables it skips
    gone = sorted(set(state) - set(official) - {"logit_scale"})
    assert record["dropped"] == gone and "visual.head.weight" in gone and "text.text_projection" in gone
    # the new head: EVAVisionTransformer's initialisation, bit for bit from the same RNG state
    head = torch.nn.Linear(64, 20)
    torch.manual_seed(3)
    init_head(head)
    assert torch.equal(model.visual_projection.weight, head.weight)
    assert torch.equal(model.visual_projection.bias, head.bias) and not head.bias.any()
    assert model.config.embed_dim == 20 and model.config.adapter["input_norm"] == "l2"

    # the new adapter gets the official TextProj's initialisation: same RNG state, same weights
    from llm2clip_fast.models.text_adapter import TextAdapter

    torch.manual_seed(11)
    ours = TextAdapter(24, 20, num_blocks=4, expansion=2)
    torch.manual_seed(11)
    theirs = TextProj(embedding_dim=24, output_dim=20, expansion_factor=2, num_layers_text=4)
    pairs = {"blocks.{i}.norm": "text_adaptor.{i}.ln", "blocks.{i}.fc1": "text_adaptor.{i}.fn.0",
             "blocks.{i}.fc2": "text_adaptor.{i}.fn.3"}
    theirs_state = theirs.state_dict()
    for i in range(4):
        for a, b in pairs.items():
            for p in ("weight", "bias"):
                assert torch.equal(ours.state_dict()[f"{a.format(i=i)}.{p}"],
                                   theirs_state[f"{b.format(i=i)}.{p}"])
    assert torch.equal(ours.proj.weight, theirs_state["text_adaptor.5.weight"])

    # --keep-projection keeps the file's CLIP head; an LLM2CLIP file refuses the new-part options
    convert_main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "k"), "--model-config", cfg,
                  "--llm-dim", "24", "--keep-projection"])
    kept = LLM2CLIPModel.from_pretrained(tmp_path / "k")
    assert torch.equal(kept.visual_projection.weight, visual.head.weight.detach())
    with pytest.raises(ValueError, match="give --llm-dim"):
        convert_main(["--from", "eva-clip", str(src), "--out", str(tmp_path / "x"), "--model-config", cfg])


def test_vision_timm_loads_a_local_checkpoint_with_its_logit_scale(tmp_path):
    from _eva_clip_checkpoint import TINY
    from _timm_environment import require_timm

    from llm2clip_fast.convert.eva_clip_vision import geometry_from_model_config
    from llm2clip_fast.models.vision import VisionTower

    require_timm()
    visual, state = _plain_eva_clip(seed=5)
    file = tmp_path / "eva.safetensors"
    save_file(state, str(file))
    timm_cfg = geometry_from_model_config(TINY, "tiny").timm_config()
    demo = make_demo(tmp_path / "demo")
    argv = stage2_args(demo, tmp_path / "run", "--steps", "1", "--lr", "1e-7", "--embed-dim", "8")
    argv.remove("--vision-preset"), argv.remove("micro")
    assert train_main([*argv, "--vision-timm", timm_cfg["model_name"], "--vision-timm-args",
                       json.dumps(timm_cfg["model_args"]), "--vision-timm-checkpoint", str(file)]) == 0
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert math.log(record["logit_scale"]) == pytest.approx(4.6052, abs=1e-4)
    tower = VisionTower.from_timm(timm_cfg["model_name"], timm_cfg["model_args"])
    from llm2clip_fast.models.timm_vision import load_checkpoint_file

    load_checkpoint_file(tower.model, str(file))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (tower.eval()(pixels) - visual.forward_features(pixels)).abs().max() <= 1e-5
    broken = dict(state)
    del broken["visual.blocks.1.mlp.w3.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['blocks\.1\.mlp\.fc2\.weight'\]"):
        load_checkpoint_file(tower.model, str(tmp_path / "broken.safetensors"))


# -- items 7 and 8: optimizer and run length ---------------------------------------------------------------

def _stage2_recipe(*argv: str):
    from llm2clip_fast.train.__main__ import parse_args
    from llm2clip_fast.train.cli.recipes import STAGE2_RECIPES, resolve_recipe

    args = parse_args(["stage2", "--data", "d", "--out", "o", "--embeddings", "c", *argv])
    resolve_recipe(args, STAGE2_RECIPES)
    return args


def test_recipe_adamw_betas_and_eps_are_what_every_official_model_config_gets():
    from _llm2clip_training_reference import OFFICIAL_MODEL_CONFIGS, RUN_SH, get_default_params

    got = {(p["beta1"], p["beta2"], p["eps"]) for p in map(get_default_params, OFFICIAL_MODEL_CONFIGS)}
    assert got == {(0.9, 0.999, 1e-8)}  # EVA02 and OpenAI towers alike: no "vit" in any shipped name
    assert get_default_params(RUN_SH["model"])["beta2"] == 0.999
    assert get_default_params("ViT-L-14")["beta2"] == 0.98  # the rule the recipe would follow elsewhere
    args = _stage2_recipe("--recipe", "llm2clip")
    assert (args.beta1, args.beta2, args.eps) == (0.9, 0.999, 1e-8)
    assert {args.recipe_origin[k] for k in ("beta1", "beta2", "eps")} == {"recipe"}
    explicit = _stage2_recipe("--recipe", "llm2clip", "--beta1", "0.8", "--eps", "1e-7")
    assert (explicit.beta1, explicit.beta2, explicit.eps) == (0.8, 0.999, 1e-7)
    plain = _stage2_recipe()
    assert (plain.beta1, plain.beta2, plain.eps) == (0.9, 0.98, 1e-6)  # the defaults did not move


def test_text_ld_above_one_is_a_no_op_in_the_official_optimizer():
    import argparse

    from _llm2clip_training_reference import RUN_SH, get_assigner

    class Tower:
        def get_num_layers(self):
            return 4

    model = argparse.Namespace(visual=Tower(), text=Tower())
    run = argparse.Namespace(**{k: RUN_SH[k] for k in ("ld", "visual_ld", "text_ld")})
    visual, text = get_assigner(run, model)
    assert text is None  # --text-ld=1.01: no assigner, the adapter trains at the plain lr
    assert visual.values == pytest.approx([0.85 ** (5 - i) for i in range(6)])


def test_recipe_runs_20_epochs_unless_steps_are_given_and_uses_the_official_adamw(tmp_path):
    from _llm2clip_training_reference import RUN_SH

    args = _stage2_recipe("--recipe", "llm2clip")
    assert args.epochs == RUN_SH["epochs"] == 20 and args.steps is None
    args = _stage2_recipe("--recipe", "llm2clip", "--steps", "5")
    assert args.epochs is None and args.recipe_origin["epochs"] == "default"
    demo = make_demo(tmp_path / "demo")
    out = tmp_path / "run"
    argv = [a for a in stage2_args(demo, out, "--steps", "1", "--embed-dim", "16") if a != "--batch-size"]
    argv.remove("8")
    assert train_main([*argv, "--recipe", "llm2clip", "--global-batch-size", "8"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["beta1"], saved["beta2"], saved["eps"]) == (0.9, 0.999, 1e-8)
    from llm2clip_fast.train.checkpoint import load_latest_usable

    state = load_latest_usable(out, lambda _: None).optimizer_state
    assert {(tuple(g["betas"]), g["eps"]) for g in state["param_groups"]} == {((0.9, 0.999), 1e-8)}


# -- item 8: the two-source resampled mix, the official caption keys ----------------------------------------

def _official_shards(folder: Path, seed: int, n: int = 24) -> str:
    """Demo samples as the official shards hold them: key.png + key.json with shortSV_captions and
    longSV_captions (keys that repeat across the two folders, as cc3m's and cc12m's do)."""
    import io
    import tarfile

    from llm2clip_fast.data.demo import write_demo

    spec = write_demo(folder / "src", n_train=n, n_val=0, n_long_detail_groups=0, image_size=32, seed=seed,
                      format="wds")["train"]
    from llm2clip_fast.data.sources import open_source

    source = open_source(spec)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i in range(len(source)):
            key = f"{i:09d}"
            png = io.BytesIO()
            source.image_at(i).save(png, format="PNG")
            caps = source.captions_at(i)
            meta = json.dumps({"shortSV_captions": caps["short"], "longSV_captions": caps["long"]}).encode()
            for name, data in ((f"{key}.png", png.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder / "00000.tar")


def test_mix_draws_each_batchs_source_as_the_official_mixing_dataloader(tmp_path):
    from _llm2clip_training_reference import mixing_dataset_index, mixing_sample_weights

    from llm2clip_fast.data.sources import open_source

    a, b = _official_shards(tmp_path / "cc3m", 0, 16), _official_shards(tmp_path / "cc12m", 1, 48)
    mix = open_source(f"{a};{b}")
    assert mix.names == ["cc3m", "cc12m"] and len(mix) == 64
    assert mix.caption_names == ["shortSV_captions", "longSV_captions"]
    assert mix.key_at(0) == "cc3m/000000000" and mix.key_at(16) == "cc12m/000000000"
    weights = mixing_sample_weights([16, 48])
    assert mix.weights == pytest.approx(list(weights))
    for epoch in range(3):
        parts = mix.batch_parts(16, seed=0, epoch=epoch)
        assert parts == [mixing_dataset_index(c, 16, epoch, weights, 2) for c in range(16)]
    # each global batch from one source, on every rank; a shuffled pass or, resampled, with replacement
    for resampled in (False, True):
        mix = open_source(f"{a};{b}", resampled=resampled)
        per_rank = [mix.rank_batches(batch_size=2, rank=r, world_size=2, seed=3, epoch=1, shuffle=True,
                                     drop_last=True) for r in range(2)]
        assert len(per_rank[0]) == 64 // 4
        for slot, part in enumerate(mix.batch_parts(16, 3, 1)):
            both = np.concatenate([per_rank[0][slot], per_rank[1][slot]])
            lo, hi = mix.offsets[part], mix.offsets[part + 1]
            assert ((both >= lo) & (both < hi)).all()
        drawn = np.concatenate(per_rank[0] + per_rank[1])
        from_a = drawn[drawn < 16]
        if not resampled:  # a shuffled pass: no repeats until a part is used up
            assert len(set(from_a.tolist())) == min(len(from_a), 16)
    with pytest.raises(ValueError, match="--data-weights gives 1 weights for 2"):
        open_source(f"{a};{b}", mix_weights="3")
    assert open_source(f"{a};{b}", mix_weights="1,1").weights == [0.5, 0.5]


def test_stage2_trains_on_the_official_two_source_mix_with_official_caption_keys(tmp_path, monkeypatch):
    from _stage2_runs import bag_of_words, stop_stage2_in_step

    from llm2clip_fast.data.embedding_cache import build_embedding_cache
    from llm2clip_fast.data.sources import open_source

    a, b = _official_shards(tmp_path / "cc3m", 0, 16), _official_shards(tmp_path / "cc12m", 1, 32)
    data = f"{a};{b}"
    source = open_source(data)
    build_embedding_cache(source.iter_captions(), bag_of_words, tmp_path / "cache",
                          caption_names=source.caption_names, dim=24, metadata={"path": "bag-of-words"})
    demo = {"cache": tmp_path / "cache", "data": data}

    def argv(out: Path) -> list[str]:
        return [*stage2_args(demo, out, "--steps", "4"), "--caption", "short:0.5,long:0.5",
                "--dataset-resampled", "--save-every", "2"]

    assert train_main(argv(tmp_path / "full")) == 0
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["caption_mix"] == {"shortSV_captions": 0.5, "longSV_captions": 0.5}
    assert saved["data_mix"]["resampled"]
    assert saved["data_mix"]["parts"]["cc12m"]["weight"] == pytest.approx(2 / 3)
    # exact resume holds on the mix
    stop_stage2_in_step(monkeypatch, argv(tmp_path / "cut"), 3)
    assert train_main([*argv(tmp_path / "cut"), "--resume"]) == 0
    full = LLM2CLIPModel.from_pretrained(tmp_path / "full" / "model").state_dict()
    cut = LLM2CLIPModel.from_pretrained(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(full[k], cut[k]) for k in full)


# -- item 6: the stage-1 objective ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from llm2clip_fast.models.tiny_llm import build_tiny_llm

    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "llama", "llama", hidden_size=32, num_layers=1,
                          num_heads=4, num_kv_heads=2)


def _pairs_manifest(folder: Path, n: int = 24, prefix: str = "t") -> Path:
    colours, shapes = ["red", "green", "blue", "yellow", "purple", "orange"], ["circle", "square", "star"]
    rows = [{"key": f"{prefix}{i}", "short": f"a {colours[i % 6]} {shapes[i % 3]}",
             "long": f"a photo of a {colours[i % 6]} {shapes[i % 3]} next to a {colours[(i + 2) % 6]} square"}
            for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stage1_args(*argv: str):
    import argparse

    from llm2clip_fast.train import stage1
    from llm2clip_fast.train.cli.recipes import resolve_recipe

    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    args = parser.parse_args(list(argv))
    resolve_recipe(args)
    return args


def test_stage1_recipe_texts_are_the_official_training_texts(tiny_llama):
    """The strings the official collator tokenises (E5_cc3m.py's cc3m branch, run_supervised.py's
    prepare_for_tokenization, llm2vec's split) equal ours under the recipe's instructions."""
    from _llm2clip_training_reference import (
        cc3m_texts,
        get_cc3m,
        llm2vec_split,
        prepare_for_tokenization_llama3,
    )

    from llm2clip_fast.models.llm_encoder import LLMTextEncoder

    args = _stage1_args("--llm", "x", "--data", "x", "--out", "x", "--recipe", "llm2clip")
    encoder = LLMTextEncoder.from_pretrained(tiny_llama, device="cpu", template="llama3",
                                             doc_max_length=args.doc_max_length, max_length=args.max_length)
    import random

    rows = [["a red circle", "a photo of a red circle on a table"],
            ["two dogs", "two brown dogs run across a green field under a cloudy sky"],
            ["a cup", "a white cup of coffee on a wooden desk next to a laptop"]]
    rng = random.Random(0)
    for sample in get_cc3m(rows, rng):
        query, pos, neg = cc3m_texts(sample)
        long_query = sample["random_num"] == 1
        instruction = args.query_instruction_long if long_query else args.query_instruction_short
        ours_q = encoder.llm2vec_strings([sample["query"]], [instruction])
        assert (ours_q[0][0], ours_q[1][0]) == llm2vec_split(prepare_for_tokenization_llama3(query))
        for doc, text in ((pos, sample["positive"]), (neg, sample["negative"])):
            ours = encoder.llm2vec_strings([text], [None])
            assert (ours[0][0], ours[1][0]) == llm2vec_split(prepare_for_tokenization_llama3(doc))
    assert (args.loss, args.hard_negative_other_image, args.schedule) == ("hardneg", True, "linear")
    assert (args.max_length, args.doc_max_length, args.scale, args.batch_size) == (512, 512, 50.0, 512)


def test_other_image_negatives_follow_the_official_rule(tmp_path):
    from _llm2clip_training_reference import get_cc3m

    from llm2clip_fast.data.sources import open_source
    from llm2clip_fast.train.stage1 import other_image_negatives

    source = open_source(_pairs_manifest(tmp_path), require_images=False)
    rows = [[source.captions_at(i)["short"], source.captions_at(i)["long"]] for i in range(len(source))]
    import random

    for sample in get_cc3m(rows, random.Random(1)):  # the official rule: another row, the positive's kind
        kind = 1 if sample["random_num"] == 0 else 0
        assert sample["negative"] in [r[kind] for r in rows]
    args = _stage1_args("--llm", "x", "--data", "x", "--out", "x", "--recipe", "llm2clip")
    keys = source.keys()
    flips = [i % 2 == 1 for i in range(len(keys))]
    negatives = other_image_negatives(source, keys, flips, args, epoch=0)
    for i, (neg, long_query) in enumerate(zip(negatives, flips, strict=True)):
        kind = "short" if long_query else "long"
        owners = [j for j in range(len(source)) if source.captions_at(j)[kind] == neg]
        assert (owners and i not in owners) or len(owners) > 1
    assert negatives == other_image_negatives(source, keys, flips, args, epoch=0)  # seeded: resumable
    assert negatives != other_image_negatives(source, keys, flips, args, epoch=1)


def test_stage1_recipe_runs_from_a_merged_lora_chain_on_a_two_source_mix(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from llm2clip_fast.train import stage1

    # an "MNTP" adapter to start from, as McGill's are
    torch.manual_seed(4)
    base = AutoModel.from_pretrained(tiny_llama)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / "mntp")
    merged = peft.merge_and_unload().state_dict()

    a, b = _pairs_manifest(tmp_path / "capsA", 16, "a"), _pairs_manifest(tmp_path / "capsB", 32, "b")
    args = _stage1_args("--llm", str(tiny_llama), "--lora", str(tmp_path / "mntp"), "--data", f"{a};{b}",
                        "--out", str(tmp_path / "run"), "--recipe", "llm2clip", "--batch-size", "8",
                        "--steps", "2", "--warmup-steps", "1", "--eval-fraction", "0", "--quiet",
                        "--max-length", "48", "--template", "llama3")
    built = stage1.build_trainable_encoder(args, torch.device("cpu"))
    ours = {k.replace("base_layer.", ""): v for k, v in built.peft_model.get_base_model().state_dict().items()
            if "lora_" not in k}
    for key, value in merged.items():
        assert torch.allclose(ours[key], value, atol=1e-6), key
    # one part per global batch, weighted
    source, _ = stage1.open_pair_data(args)
    from llm2clip_fast.train.run_spine import RunPlace

    place = RunPlace(rank=0, world_size=1, device=torch.device("cpu"))
    loader = stage1.build_pair_loader(args, source, place)
    for batch in loader:
        assert len({k.split("/")[0] for k in batch["keys"]}) == 1
    result = stage1.train_stage1(args)
    assert result.steps == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"] == "hardneg" and saved["hard_negative_other_image"] and saved["lora"]
    enc = json.loads(next((tmp_path / "run" / "merged").glob("*encoder*.json")).read_text())
    assert enc["doc_max_length"] == 512


# -- item 5: which prompt template ---------------------------------------------------------------------------

NAMES = ["meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B-Instruct",
         "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp", "/blob/ckpt/Meta-Llama-3-8B-Instruct-cc",
         "mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Llama-2-7b-chat-hf", "google/gemma-2-9b-it",
         "Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct", "microsoft/Phi-3.5-mini-instruct",
         "meta-llama/Meta-Llama-3-8B", "", "tiny/local"]


@pytest.mark.parametrize("name", NAMES)
def test_template_rules_are_llm2vecs_and_llm2clips(name):
    import argparse

    from _llm2clip_training_reference import llm2clip_prepare_for_tokenization
    from _llm2vec_0_2_3_reference import LLM2VecReference

    from llm2clip_fast.models.prompt_templates import get_template, llm2clip_template, llm2vec_template

    text = "Given a caption; !@#$%^&*()a red circle "
    model = argparse.Namespace(config=argparse.Namespace(_name_or_path=name))
    official = LLM2VecReference.prepare_for_tokenization(argparse.Namespace(model=model), text)
    assert get_template(llm2vec_template(name)).wrap(text) == official
    assert get_template(llm2clip_template(name)).wrap(text) == llm2clip_prepare_for_tokenization(name, text)


def test_auto_reads_the_name_llm2vec_reads_for_a_folder_or_hub_id(tmp_path, monkeypatch):
    """The issue's case: a folder whose config names Meta-Llama-3-8B-Instruct but whose tokenizer has no chat
    template gets the Llama-3 format from llm2vec, so from 'auto'; a tokenizer with a chat template in a
    folder that names nothing gets none (as llm2vec), the Llama-3 format only with 'chat'."""
    from _llm2clip_training_reference import llm2vec_from_pretrained_name_or_path

    from llm2clip_fast.models.llm_encoder import LLMTextEncoder
    from llm2clip_fast.models.prompt_templates import llm2vec_name_or_path
    from llm2clip_fast.models.tiny_llm import build_tiny_llm

    folder = build_tiny_llm(tmp_path / "named", "llama", hidden_size=32, num_layers=1, num_heads=4,
                            num_kv_heads=2)
    config = json.loads((folder / "config.json").read_text())
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(folder, plain)
    config["_name_or_path"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    (folder / "config.json").write_text(json.dumps(config))
    for path in (folder, plain):
        assert llm2vec_name_or_path(str(path)) == llm2vec_from_pretrained_name_or_path(str(path))
    assert llm2vec_name_or_path("meta-llama/Meta-Llama-3-8B-Instruct") == \
        llm2vec_from_pretrained_name_or_path("meta-llama/Meta-Llama-3-8B-Instruct")
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert not tok.get("chat_template")
    assert LLMTextEncoder.from_pretrained(folder, device="cpu").template == "llama3"
    assert LLMTextEncoder.from_pretrained(plain, device="cpu").template == "none"
    tok["chat_template"] = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                            "{% endfor %}")
    (plain / "tokenizer_config.json").write_text(json.dumps(tok))
    assert LLMTextEncoder.from_pretrained(plain, device="cpu").template == "none"
    assert LLMTextEncoder.from_pretrained(plain, device="cpu", template="chat").template == "llama3"
    # LLM2CLIP's released LLM: its extraction forces the Meta-Llama-3-8B-Instruct name
    release = tmp_path / "release"
    shutil.copytree(plain, release)
    cfg = json.loads((release / "config.json").read_text())
    cfg.update({"architectures": ["LlamaEncoderModel"],
                "auto_map": {"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"}})
    (release / "config.json").write_text(json.dumps(cfg))
    assert LLMTextEncoder.from_pretrained(release, device="cpu").template == "none"
    assert LLMTextEncoder.from_pretrained(release, device="cpu", template="llm2clip").template == "llama3"


# -- item 4: LLM2CLIP's encoding length -------------------------------------------------------------------

def test_embed_recipe_llm2clip_encodes_as_llm2clips_extraction(tmp_path):
    """llm2clip/data/extract_embedding.py: LLM2Vec(llm_model, tokenizer, pooling_mode="mean", max_length=512,
    doc_max_length=512) after forcing _name_or_path to meta-llama/Meta-Llama-3-8B-Instruct on the released
    LLM; our embed --recipe llm2clip on a folder shaped like that release gives the same vectors, and the
    settings are part of the cache's fingerprint."""
    import shutil

    from _llm2vec_0_2_3_reference import BiModelReference, LLM2VecReference
    from _tiny_llama import WORDS, write_tiny_llama
    from transformers import AutoModel, AutoTokenizer

    from llm2clip_fast.data.embedding_cache import EmbeddingCache

    llm = write_tiny_llama(tmp_path / "llm")
    release = tmp_path / "release"
    shutil.copytree(llm, release)
    cfg = json.loads((release / "config.json").read_text())
    cfg.update({"architectures": ["LlamaEncoderModel"],
                "auto_map": {"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"}})
    (release / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=n)) for n in (12, 430, 470, 30)]  # two cut at 400, not 512
    manifest = tmp_path / "caps.jsonl"
    manifest.write_text("".join(json.dumps({"key": f"k{i}", "long": c}) + "\n"
                                for i, c in enumerate(captions)))
    out = tmp_path / "cache"
    assert train_main(["embed", "--llm", str(release), "--data", str(manifest), "--out", str(out), "--dtype",
                       "fp32", "--recipe", "llm2clip", "--quiet", "--device", "cpu",
                       "--precision", "fp32"]) == 0  # the transcription runs fp32; auto is bf16 on AMX CPUs
    cache = EmbeddingCache.open(out)
    meta = cache.metadata
    assert (meta["max_length"], meta["doc_max_length"], meta["template"]) == (512, 512, "llama3")
    model = AutoModel.from_pretrained(llm).eval()
    model.config._name_or_path = "meta-llama/Meta-Llama-3-8B-Instruct"  # the extraction's workaround
    ref = LLM2VecReference(BiModelReference(model), AutoTokenizer.from_pretrained(llm), pooling_mode="mean",
                           max_length=512, doc_max_length=512)
    want = ref.encode([["", c] for c in captions], batch_size=2, device="cpu")
    got = cache.lookup([f"k{i}" for i in range(4)], "long")
    assert (got - want).abs().max() <= 1e-5
    # llm2vec's default cap (400) cuts the two long ones: other vectors; the cache built with 512 refuses them
    from llm2clip_fast.train.embed import embed

    with pytest.raises(ValueError, match="'doc_max_length': 400"):
        embed(llm=str(release), data=str(manifest), out=out, dtype="fp32", template="llm2clip",
              max_length=512, doc_max_length=400, device="cpu", progress=False, precision="fp32")
    embed(llm=str(release), data=str(manifest), out=tmp_path / "cut", dtype="fp32", template="llm2clip",
          max_length=512, doc_max_length=400, device="cpu", progress=False, precision="fp32")
    cut = EmbeddingCache.open(tmp_path / "cut")
    assert cut.metadata["doc_max_length"] == 400
    assert not torch.allclose(cut.lookup(["k1"], "long"), got[1:2], atol=1e-4)
    assert torch.allclose(cut.lookup(["k0"], "long"), got[0:1], atol=1e-5)


def test_eval_and_convert_take_the_encoding_settings(tmp_path):
    from llm2clip_fast.train.__main__ import parse_args
    from llm2clip_fast.train.cli.recipes import EVAL_RECIPES, resolve_recipe
    from llm2clip_fast.train.eval import encoding_overrides

    args = parse_args(["eval", "--model", "m", "--data", "d", "--recipe", "llm2clip"])
    resolve_recipe(args, EVAL_RECIPES)
    assert encoding_overrides(args) == {"max_length": 512, "doc_max_length": 512}
    assert args.template == "llm2clip"
    args = parse_args(["eval", "--model", "m", "--data", "d", "--recipe", "llm2clip",
                       "--doc-max-length", "300"])
    resolve_recipe(args, EVAL_RECIPES)
    assert encoding_overrides(args)["doc_max_length"] == 300
    plain = parse_args(["eval", "--model", "m", "--data", "d"])
    resolve_recipe(plain, EVAL_RECIPES)
    assert encoding_overrides(plain) == {} and plain.template is None  # what the model recorded
    from _llm2clip_release import _release_parts, _release_state, _write_release

    src = _write_release(tmp_path / "rel", _release_state(*_release_parts()))
    convert_main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "a"), "--llm", "L",
                  "--doc-max-length", "256"])
    llm = LLM2CLIPModel.from_pretrained(tmp_path / "a").config.llm
    assert (llm["max_length"], llm["doc_max_length"], llm["template"]) == (512, 256, "llm2clip")
    with pytest.raises(ValueError, match="need --llm"):
        convert_main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "b"), "--max-length", "77"])


# -- item 9: their embeddings and checkpoints, imported ---------------------------------------------------

def _official_embedding_tars(shard: str, seed: int) -> dict[str, torch.Tensor]:
    """extract_embedding.py's tar beside ``shard``: random 24-d "embeddings" of each sample's captions."""
    import tarfile

    from _llm2clip_training_reference import save_embeddings_to_tar

    with tarfile.open(shard) as tar:
        keys = sorted({m.name.split(".")[0] for m in tar.getmembers()})
    g = torch.Generator().manual_seed(seed)
    emb = {k: torch.randn(len(keys), 24, generator=g) for k in ("shortSV_captions", "longSV_captions")}
    save_embeddings_to_tar(shard.replace(".tar", "_text_embeddings.tar"), keys, emb)
    return {"keys": keys, **emb}


def test_embed_imports_llm2clip_embedding_tars_checked_against_the_data(tmp_path, caplog):
    from _llm2clip_training_reference import get_text

    from llm2clip_fast.data.embedding_cache import EmbeddingCache

    a, b = _official_shards(tmp_path / "cc3m", 0, 16), _official_shards(tmp_path / "cc12m", 1, 24)
    ea, eb = _official_embedding_tars(a, 5), _official_embedding_tars(b, 6)
    out = tmp_path / "cache"
    assert train_main(["embed", "--import-llm2clip", "--data", f"{a};{b}", "--out", str(out), "--dtype",
                       "fp32", "--quiet"]) == 0
    cache = EmbeddingCache.open(out)
    assert cache.caption_names == ["shortSV_captions", "longSV_captions"] and len(cache) == 40
    assert cache.metadata["doc_max_length"] == 512 and cache.metadata["template"] == "llama3"
    assert torch.equal(cache.lookup(["cc12m/000000003"], "longSV_captions")[0], eb["longSV_captions"][3])
    # what the official reader hands the model for that sample: one of the two float32 vectors
    item = {"jpg": b"", "shortsv_captions": ea["shortSV_captions"][2].numpy().tobytes(),
            "longsv_captions": ea["longSV_captions"][2].numpy().tobytes()}
    official = get_text(item, lambda pair: pair[0])["text"]
    assert np.array_equal(official, cache.lookup(["cc3m/000000002"], "shortSV_captions")[0].numpy())
    # stage 2 trains on it, its captions checked against the data's
    demo = {"cache": out, "data": f"{a};{b}"}
    assert train_main([*stage2_args(demo, tmp_path / "run", "--steps", "1", "--embed-dim", "8"),
                       "--caption", "short:0.5,long:0.5"]) == 0
    # a sample without its vector names itself; no --data is refused unless trusted
    (tmp_path / "cc12m" / "00000_text_embeddings.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"00000_text_embeddings\.tar"):
        train_main(["embed", "--import-llm2clip", "--data", f"{a};{b}", "--out", str(tmp_path / "c2")])
    with pytest.raises(ValueError, match="--trust-embedding-keys"):
        train_main(["embed", "--import-llm2clip", str(tmp_path / "cc3m"), "--out", str(tmp_path / "c3")])
    assert train_main(["embed", "--import-llm2clip", str(tmp_path / "cc3m"), "--trust-embedding-keys",
                       "--out", str(tmp_path / "c3"), "--quiet"]) == 0
    trusted = EmbeddingCache.open(tmp_path / "c3")
    assert trusted.metadata["captions_unverified"] and len(trusted) == 16
    with caplog.at_level("WARNING"):
        assert train_main([*stage2_args({"cache": tmp_path / "c3", "data": a}, tmp_path / "run3", "--steps",
                                        "1", "--embed-dim", "8"), "--caption", "long"]) == 0
    assert any("--trust-embedding-keys" in r.getMessage() for r in caplog.records)


def _fake_deepspeed_classes():
    """Classes that pickle under DeepSpeed 0.8.1's own names (deepspeed.runtime.config.DeepSpeedConfig
    with a nested pydantic-style zero config and an enum), and one whose unpickling would run a shell."""
    import enum
    import sys
    import types

    config_mod = types.ModuleType("deepspeed.runtime.config")
    zero_mod = types.ModuleType("deepspeed.runtime.zero.config")

    class ZeroStageEnum(int, enum.Enum):
        disabled = 0
        optimizer_states = 1

    class DeepSpeedZeroConfig:
        def __init__(self):
            self.stage = ZeroStageEnum.optimizer_states
            self.reduce_bucket_size = 500000000

    class DeepSpeedConfig:
        def __init__(self):
            self._param_dict = {"train_batch_size": 4096, "fp16": {"enabled": True}}
            self.zero_config = DeepSpeedZeroConfig()
            self.fp16_enabled = True

    class Sneaky:
        def __reduce__(self):
            return (os.system, (f"touch {SNEAKY_FILE}",))

    for mod, classes in ((config_mod, [DeepSpeedConfig]), (zero_mod, [ZeroStageEnum, DeepSpeedZeroConfig])):
        for cls in classes:
            cls.__module__ = mod.__name__
            setattr(mod, cls.__name__, cls)
            cls.__qualname__ = cls.__name__
        sys.modules[mod.__name__] = mod
    for parent in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero"):
        sys.modules.setdefault(parent, types.ModuleType(parent))
    return DeepSpeedConfig, Sneaky


import os  # noqa: E402

SNEAKY_FILE = Path("/tmp/llm2clip_fast_deepspeed_sneaky_test")


def test_deepspeed_checkpoint_converts_without_running_pickled_code(tmp_path):
    import sys
    from collections import OrderedDict

    from _eva_clip_checkpoint import _config_file, _official, _state, _write
    from _timm_environment import require_timm

    from llm2clip_fast.convert.deepspeed_checkpoint import Opaque, load_deepspeed_model_states

    require_timm()
    visual, text, logit_scale = _official(seed=2)
    module = OrderedDict((k, v.half()) for k, v in _state(visual, text, logit_scale).items())
    config_cls, sneaky = _fake_deepspeed_classes()
    try:
        # DeepSpeed 0.8.1 engine._save_checkpoint's keys, ZeRO-1 fp16 (optimizer None, param_shapes), and
        # main.py's client_state {"epoch": N}
        state = dict(module=module, buffer_names=[], optimizer=None,
                     param_shapes=[OrderedDict((k, v.shape) for k, v in module.items())], lr_scheduler=None,
                     data_sampler=None, random_ltd=None, sparse_tensor_module_names=set(), skipped_steps=3,
                     global_steps=1200, global_samples=1200 * 4096, dp_world_size=8, mp_world_size=1,
                     ds_config=config_cls(), ds_version="0.8.1", epoch=20)
        ckpt = tmp_path / "checkpoints" / "epoch_20"
        ckpt.mkdir(parents=True)
        torch.save(state, ckpt / "mp_rank_00_model_states.pt")
        crafted = tmp_path / "crafted" / "epoch_1"
        crafted.mkdir(parents=True)
        torch.save({**state, "sneaky": sneaky()}, crafted / "mp_rank_00_model_states.pt")
        (tmp_path / "checkpoints" / "latest").write_text("epoch_20")
    finally:
        for name in ("deepspeed.runtime.config", "deepspeed.runtime.zero.config", "deepspeed.runtime.zero",
                     "deepspeed.runtime", "deepspeed"):
            sys.modules.pop(name, None)
    with pytest.raises(Exception, match="Unsupported global"):  # what torch's safe loader says alone
        torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    SNEAKY_FILE.unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"without running its code.*posix\.system"):
        load_deepspeed_model_states(crafted)  # a file naming a shell call is refused, never run
    assert not SNEAKY_FILE.exists(), "a pickled call ran"
    loaded = load_deepspeed_model_states(tmp_path / "checkpoints")
    assert isinstance(loaded["ds_config"], Opaque)
    assert isinstance(loaded["ds_config"].state["zero_config"], Opaque)
    assert loaded["epoch"] == 20 and loaded["ds_version"] == "0.8.1" and loaded["global_steps"] == 1200
    assert all(torch.equal(loaded["module"][k], v) for k, v in module.items())
    cfg = _config_file(tmp_path)
    convert_main(["--from", "eva-clip", str(ckpt), "--out", str(tmp_path / "from_ds"), "--model-config", cfg])
    _write(tmp_path / "plain.safetensors", dict(module))
    convert_main(["--from", "eva-clip", str(tmp_path / "plain.safetensors"), "--out", str(tmp_path / "plain"),
                  "--model-config", cfg])
    a = LLM2CLIPModel.from_pretrained(tmp_path / "from_ds").state_dict()
    b = LLM2CLIPModel.from_pretrained(tmp_path / "plain").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a["logit_scale"].dtype == torch.float16
    record = json.loads((tmp_path / "from_ds" / "conversion.json").read_text())
    assert record["deepspeed"] == {"epoch": 20, "global_steps": 1200, "global_samples": 1200 * 4096,
                                   "ds_version": "0.8.1"}
