"""Loading the LLMs that exist: LLM2Vec base + LoRA chains, LLM2CLIP's llm2vec-encoder folders without
remote code, and attn_implementation="xformers" (AttentionInterface registration)."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types

import pytest
import torch
from _lora_deltas import lora_deltas

from llm2clip_fast.models import xformers_attention
from llm2clip_fast.models.llm_encoder import LLMTextEncoder
from llm2clip_fast.models.tiny_llm import build_tiny_llm

CAPTIONS = ["a red circle above a blue square", "star", "two green triangles next to an orange hexagon"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("llm") / "llama", "llama", hidden_size=32, num_layers=2,
                          num_heads=4, num_kv_heads=2)


def _make_adapter(base_dir, out, seed, targets, r):
    """A peft LoRA adapter with non-zero A and B (init_lora_weights=False), saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out)
    return out


def test_lora_chain_merges_each_delta_in_order(tiny, tmp_path):
    a = _make_adapter(tiny, tmp_path / "mntp", seed=1, targets=["q_proj", "v_proj"], r=4)
    b = _make_adapter(tiny, tmp_path / "supervised", seed=2, targets=["q_proj", "o_proj", "up_proj"], r=2)
    base = LLMTextEncoder.from_pretrained(tiny, device="cpu").model.state_dict()
    merged_list = LLMTextEncoder.from_pretrained(tiny, device="cpu", lora=[a, b], merge_lora=True)
    merged_str = LLMTextEncoder.from_pretrained(tiny, device="cpu", lora=f"{a},{b}", merge_lora=True)
    assert not merged_list.has_unmerged_lora
    want = {k: v.clone().float() for k, v in base.items()}
    touched = set()
    for adapter in (a, b):
        for name, delta in lora_deltas(adapter).items():
            want[f"{name}.weight"] += delta
            touched.add(f"{name}.weight")
    assert {n.split(".")[-2] for n in touched} == {"q_proj", "v_proj", "o_proj", "up_proj"}
    for enc in (merged_list, merged_str):
        got = enc.model.state_dict()
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key].float(), want[key], atol=1e-6, rtol=1e-6)
    # Unmerged: the first adapter merged, the last still a peft wrapper that gives the same vectors.
    unmerged = LLMTextEncoder.from_pretrained(tiny, device="cpu", lora=[a, b])
    assert unmerged.has_unmerged_lora
    torch.testing.assert_close(unmerged.encode(CAPTIONS, show_progress=False),
                               merged_list.encode(CAPTIONS, show_progress=False), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a peft adapter folder"):
        LLMTextEncoder.from_pretrained(tiny, device="cpu", lora=[a, tmp_path / "missing"])


def _encoder_class_folder(tiny, out, name="LlamaEncoderModel"):
    """A copy of the tiny base model whose config names an llm2vec encoder class with remote code,
    the layout of microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(tiny).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = [name]
    cfg["auto_map"] = {"AutoModel": f"modeling_llama_encoder.{name}"}
    (out / "config.json").write_text(json.dumps(cfg))
    # The remote code would fail loudly if anything ran it.
    (out / "modeling_llama_encoder.py").write_text("raise RuntimeError('remote code must not run')\n")
    return out


def test_llm2vec_encoder_folder_loads_without_remote_code(tiny, tmp_path, caplog):
    folder = _encoder_class_folder(tiny, tmp_path / "llm2clip_llm")
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.models.llm2vec_checkpoints"):
        enc = LLMTextEncoder.from_pretrained(folder, device="cpu")
    assert type(enc.model).__name__ == "LlamaModel" and enc.bidirectional
    assert "LlamaEncoderModel" in caplog.text and "modeling_llama_encoder.LlamaEncoderModel" in caplog.text
    assert "LlamaModel" in caplog.text and "without remote code" in caplog.text
    plain = LLMTextEncoder.from_pretrained(tiny, device="cpu")
    torch.testing.assert_close(enc.encode(CAPTIONS, show_progress=False),
                               plain.encode(CAPTIONS, show_progress=False), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="llm2vec encoder"):
        LLMTextEncoder.from_pretrained(folder, device="cpu", bidirectional=False)
    # The saved encoder no longer points at remote code.
    saved = enc.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((saved / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["architectures"] == ["LlamaModel"]


def test_xformers_refused_clearly_off_cuda_or_uninstalled(tiny, monkeypatch):
    with pytest.raises(ValueError, match="CUDA only"):
        LLMTextEncoder.from_pretrained(tiny, device="cpu", attn_implementation="xformers")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ValueError, match="pip install xformers"):
            LLMTextEncoder._check_attn_implementation("xformers", torch.device("cuda"))
    with pytest.raises(ValueError, match="CUDA only"):
        xformers_attention._check_device(torch.zeros(1))


def _fake_xformers(monkeypatch):
    """xformers.ops with memory_efficient_attention written in torch (BMHK layout, additive bias), so
    the registration, layouts, GQA, scale and mask plumbing run on CPU."""

    class LowerTriangularMask:
        pass

    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        calls.append(q.shape)
        assert q.dim() == 4 and q.shape[2] == k.shape[2], "expects (B, L, H, D) with equal head counts"
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        if isinstance(attn_bias, LowerTriangularMask):
            lq, lk = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
        elif attn_bias is not None:
            assert attn_bias.shape == scores.shape and attn_bias.stride(-2) % 8 == 0
            scores = scores + attn_bias.float()
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = LowerTriangularMask
    pkg = types.ModuleType("xformers")
    pkg.__spec__ = importlib.machinery.ModuleSpec("xformers", None)
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(xformers_attention, "_check_device", lambda query: None)
    return calls


@pytest.mark.parametrize("bidirectional", [True, False])
def test_xformers_attention_plumbing_matches_sdpa(tiny, monkeypatch, bidirectional):
    calls = _fake_xformers(monkeypatch)
    monkeypatch.setattr(LLMTextEncoder, "_check_attn_implementation",
                        staticmethod(lambda name, device: xformers_attention.register_xformers_attention()))
    ref = LLMTextEncoder.from_pretrained(tiny, device="cpu", bidirectional=bidirectional)
    xf = LLMTextEncoder.from_pretrained(tiny, device="cpu", bidirectional=bidirectional,
                                        attn_implementation="xformers")
    assert xf.model.config._attn_implementation == "xformers"
    batch = ref.tokenize(CAPTIONS)  # mixed lengths: the padding mask matters
    assert batch["attention_mask"].sum(1).unique().numel() == len(CAPTIONS)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        want = ref.model(**inputs).last_hidden_state
        got = xf.model(**inputs).last_hidden_state
    assert len(calls) == xf.model.config.num_hidden_layers  # every layer went through xformers
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_xformers_matches_sdpa_on_cuda(tiny):
    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers not installed")
    ref = LLMTextEncoder.from_pretrained(tiny, device="cuda", dtype="fp16")
    xf = LLMTextEncoder.from_pretrained(tiny, device="cuda", dtype="fp16", attn_implementation="xformers")
    torch.testing.assert_close(xf.encode(CAPTIONS, show_progress=False),
                               ref.encode(CAPTIONS, show_progress=False), atol=2e-3, rtol=2e-3)
