"""Stage 1 trainer on the demo set with a tiny Llama and the packaged MiniLM (CPU, a few steps)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from llm2clip_fast.train import stage1, trainable_encoder
from llm2clip_fast.train.checkpoint import list_checkpoints
from llm2clip_fast.train.lora_targets import resolve_lora_targets
from llm2clip_fast.train.mntp import IGNORE_INDEX, mask_captions
from llm2clip_fast.train.run_log import read_jsonl


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from llm2clip_fast.data.demo import write_demo

    root = tmp_path_factory.mktemp("demo")
    specs = write_demo(root, n_train=40, n_val=12, n_long_detail_groups=0, image_size=16)
    return specs


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, demo):
    """A 2-layer Llama with a word-level tokenizer over the demo vocabulary, saved to a folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from llm2clip_fast.data.sources import open_source

    words: dict[str, None] = {}
    for spec in demo.values():
        for _, captions in open_source(spec).iter_captions():
            for text in captions.values():
                words.update(dict.fromkeys(text.lower().replace(",", " , ").replace(".", " . ").split()))
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]")
    folder = tmp_path_factory.mktemp("tiny_llama")
    fast.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _args(llm, data, out, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage1.add_arguments(parser)
    return parser.parse_args(["--llm", str(llm), "--data", data, "--out", str(out), "--batch-size", "8",
                              "--eval-size", "12", "--quiet", "--max-length", "96", *extra])


def _adapter_state(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_tiny_llama_trains_merges_and_reloads(tiny_llama, demo, tmp_path):
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder

    out = tmp_path / "run"
    args = _args(tiny_llama, demo["train"], out, "--eval-data", demo["val"], "--epochs", "2", "--lr", "5e-3",
                 "--mntp-steps", "2", "--save-every", "4")
    result = stage1.train_stage1(args)
    assert result.steps == 2 + 10  # 40 pairs / 8 = 5 steps per epoch, 2 epochs, after 2 MNTP steps
    log = read_jsonl(out / "log.jsonl")
    assert [r["phase"] for r in log[:3]] == ["mntp", "mntp", "contrastive"]
    contrastive = [r["loss"] for r in log if r["phase"] == "contrastive"]
    assert sum(contrastive[-5:]) < sum(contrastive[:5])  # the last epoch beats the first
    assert all(r["captions_per_s"] > 0 for r in log)
    # The random tiny Llama pairs 3 of the 12 held-out short/long captions; 12 steps teach it at least
    # two more (measured: 6 of 12). A run that does not train would stay at 3.
    assert result.cra_before == pytest.approx(3 / 12)
    assert result.cra_after >= result.cra_before + 2 / 12
    cra = json.loads((out / "cra.json").read_text())
    assert cra["after"] == result.cra_after and cra["pairs"] == 12
    assert (out / "loss.png").is_file() and (out / "adapter" / "adapter_config.json").is_file()

    texts = ["a large red circle and a small blue cross", "a small green square"]
    in_memory = result.encoder.encode(texts, show_progress=False)
    reloaded = LLMTextEncoder.from_pretrained(out / "merged").encode(texts, show_progress=False)
    torch.testing.assert_close(reloaded, in_memory, rtol=0, atol=0)
    with_adapter = LLMTextEncoder.from_pretrained(tiny_llama, lora=out / "adapter")
    with_adapter = with_adapter.encode(texts, show_progress=False)
    torch.testing.assert_close(with_adapter, in_memory, rtol=1e-4, atol=1e-5)
    base = LLMTextEncoder.from_pretrained(tiny_llama).encode(texts, show_progress=False)
    assert not torch.allclose(base, in_memory, atol=1e-3)


def test_minilm_trains_with_infonce_and_learned_scale(demo, tmp_path):
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    out = tmp_path / "minilm"
    args = _args(packaged_minilm_path(), demo["train"], out, "--eval-fraction", "0.2", "--steps", "4",
                 "--lr", "1e-3", "--loss", "infonce", "--learn-scale", "--scale", "20", "--grad-accum", "2",
                 "--batch-size", "4", "--lora-r", "4", "--max-length", "48")
    result = stage1.train_stage1(args)
    log = read_jsonl(out / "log.jsonl")
    assert len(log) == 4 and log[-1]["scale"] != 20.0
    assert sum(r["loss"] for r in log[-2:]) < sum(r["loss"] for r in log[:2])
    # MiniLM already pairs every held-out caption with its partner; training must keep it that way.
    assert result.cra_before == result.cra_after == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lora_targets_resolved"] == ["query", "key", "value", "dense"]


def test_kill_and_resume_matches_uninterrupted_run(tiny_llama, demo, tmp_path, monkeypatch):
    # 40 pairs in batches of 16: 2 steps per epoch, so resuming at step 2 starts a new epoch.
    common = ("--eval-fraction", "0", "--steps", "4", "--save-every", "2", "--lr", "5e-3",
              "--batch-size", "16",
              "--warmup-steps", "2", "--lora-dropout", "0.1")
    straight = tmp_path / "straight"
    stage1.train_stage1(_args(tiny_llama, demo["train"], straight, *common))

    killed = tmp_path / "killed"
    original_log = stage1.JsonlLog.log

    def die_at_step_3(self, record):
        original_log(self, record)
        if record["step"] == 3:
            raise KeyboardInterrupt  # a kill between checkpoints: step 3 must be redone
    monkeypatch.setattr(stage1.JsonlLog, "log", die_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        stage1.train_stage1(_args(tiny_llama, demo["train"], killed, *common))
    monkeypatch.setattr(stage1.JsonlLog, "log", original_log)
    assert [p.name for p in list_checkpoints(killed)] == ["step_00000002"]
    assert not (killed / "adapter").exists()

    stage1.train_stage1(_args(tiny_llama, demo["train"], killed, *common, "--resume"))
    a, b = _adapter_state(straight), _adapter_state(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in read_jsonl(killed / "log.jsonl")] == [1, 2, 3, 4]
    losses = [r["loss"] for r in read_jsonl(killed / "log.jsonl")]
    assert losses == [r["loss"] for r in read_jsonl(straight / "log.jsonl")]
    shutil.rmtree(straight)


def test_int8_base_with_gradient_checkpointing(tiny_llama, demo, tmp_path):
    from llm2clip_fast.models.llm_encoder import LLMTextEncoder

    pytest.importorskip("bitsandbytes")
    out = tmp_path / "int8"
    result = stage1.train_stage1(_args(tiny_llama, demo["train"], out, "--eval-fraction", "0", "--steps", "3",
                                       "--lr", "5e-3", "--load-in-8bit", "--gradient-checkpointing"))
    log = read_jsonl(out / "log.jsonl")
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]
    # The adapter is merged into a full-precision reload of the base, which then loads on its own.
    texts = ["a small green square", "a large red circle"]
    reloaded = LLMTextEncoder.from_pretrained(out / "merged").encode(texts, show_progress=False)
    torch.testing.assert_close(reloaded, result.encoder.encode(texts, show_progress=False), rtol=0, atol=0)


def test_bad_options_fail_at_start(tiny_llama, demo, tmp_path):
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    with pytest.raises(ValueError, match="--batch-size must be >= 2"):
        stage1.train_stage1(_args(tiny_llama, demo["train"], tmp_path / "a", "--batch-size", "1"))
    with pytest.raises(ValueError, match=r"no caption field|lacks caption column"):
        stage1.train_stage1(_args(tiny_llama, demo["train"], tmp_path / "b", "--long-caption", "detailed"))
    with pytest.raises(ValueError, match=r"unknown LoRA target module\(s\) qkv.*q_proj"):
        stage1.train_stage1(_args(tiny_llama, demo["train"], tmp_path / "c", "--lora-targets", "q_proj,qkv"))
    with pytest.raises(ValueError, match=r"masked-LM head|token-prediction head"):
        stage1.train_stage1(_args(packaged_minilm_path(), demo["train"], tmp_path / "d", "--mntp-steps", "1"))
    with pytest.raises(ValueError, match="must differ"):
        stage1.train_stage1(_args(tiny_llama, demo["train"], tmp_path / "e", "--short-caption", "long"))


def test_resolve_lora_targets_auto_and_explicit(tiny_llama):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_llama)
    assert resolve_lora_targets(model, None) == list(trainable_encoder.resolve_lora_targets(model, ["auto"]))
    assert resolve_lora_targets(model, ["auto"]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"]
    assert resolve_lora_targets(model, ["q_proj", "v_proj", "q_proj"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("decoder", [True, False])
def test_mask_captions(decoder):
    ids = torch.tensor([[2, 10, 11, 12, 13, 0], [2, 14, 15, 0, 0, 0]])
    attn = (ids != 0).long()
    gen = torch.Generator().manual_seed(0)
    masked, labels = mask_captions(ids, attn, mask_id=4, special_ids={0, 2}, probability=0.5, generator=gen,
                                   decoder=decoder)
    picked = labels != IGNORE_INDEX
    assert picked.any()
    assert torch.equal(labels[picked], ids[picked]) and (masked[picked] == 4).all()
    assert torch.equal(masked[~picked], ids[~picked])
    assert not picked[:, 0].any() and not picked[attn == 0].any()


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tiny_llama, demo, tmp_path,
                                                                            monkeypatch, capsys):
    """Issue 29: SIGTERM in a step saves a checkpoint at that step and exits 143; --resume is exact."""
    import os
    import signal

    from llm2clip_fast.train.__main__ import cli

    monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)
    common = ["--llm", str(tiny_llama), "--data", demo["train"], "--batch-size", "16", "--eval-fraction", "0",
              "--steps", "3", "--save-every", "10", "--quiet", "--max-length", "96", "--lr", "5e-3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert cli(["stage1", *common, "--out", str(straight)]) == 0
    from llm2clip_fast.train import training_loop

    real, calls = training_loop.apply_update, {"n": 0}

    def sigterm_in_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(training_loop, "apply_update", sigterm_in_step_2)
    capsys.readouterr()
    assert cli(["stage1", *common, "--out", str(stopped)]) == 143
    assert "stopped by SIGTERM after step 2 of 3; checkpoint saved at" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(stopped)] == ["step_00000002"]
    assert not (stopped / "adapter").exists()
    monkeypatch.undo()
    assert cli(["stage1", *common, "--out", str(stopped), "--resume"]) == 0
    a, b = _adapter_state(straight), _adapter_state(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_jsonl(stopped / "log.jsonl")] == \
        [r["loss"] for r in read_jsonl(straight / "log.jsonl")]
