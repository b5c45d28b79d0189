"""LLMTextEncoder: bidirectional attention on four decoder families, pooling masks, encode order,
8-bit loading, LoRA, save/restore, and the packaged MiniLM against sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch

from llm2clip_fast.models.bidirectional import is_bidirectional, set_bidirectional
from llm2clip_fast.models.llm_encoder import ENCODER_CONFIG_NAME, LLMTextEncoder, packaged_minilm_path
from llm2clip_fast.models.tiny_llm import FAMILIES, build_tiny_llm

CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles",
    "an image with one tiny pink heart in the top right corner and a large yellow star",
    "star",
]
INSTRUCTION = "Given a caption, retrieve a detailed relevant caption: "


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_llms")
    return {fam: build_tiny_llm(root / fam, fam, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
            for fam in FAMILIES}


@pytest.fixture(scope="module")
def encoders(tiny_dirs):
    """One loaded encoder per family (default SDPA attention); tests that change one restore it."""
    return {fam: LLMTextEncoder.from_pretrained(tiny_dirs[fam], device="cpu") for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_attention_sees_later_tokens(encoders, family):
    enc = encoders[family]
    try:
        for attn in ("sdpa", "eager"):
            enc.model.set_attn_implementation(attn)
            set_bidirectional(enc.model, True)
            _check_bidirectional(enc)
    finally:
        enc.model.set_attn_implementation("sdpa")
        set_bidirectional(enc.model, True)


def _check_bidirectional(enc):
    # Rows differ only in their 6th token; the 7th position is padding.
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2], [1, 40, 41, 42, 43, 99, 2]])
    full = torch.ones_like(ids)
    padded = full.clone()
    padded[:, -1] = 0

    def states(mask):
        with torch.no_grad():
            return enc.model(input_ids=ids, attention_mask=mask).last_hidden_state

    assert enc.bidirectional and is_bidirectional(enc.model)
    # Without padding SDPA may skip the mask entirely; with padding the mask is materialised.
    for mask in (full, padded):
        h = states(mask)
        assert not torch.allclose(h[0, 1], h[1, 1], atol=1e-6), "a later token must change earlier positions"
    # The padded position is masked out as a key: changing it changes nothing else.
    other = ids.clone()
    other[:, -1] = 7
    with torch.no_grad():
        h_other = enc.model(input_ids=other, attention_mask=padded).last_hidden_state
    torch.testing.assert_close(h_other[:, :-1], states(padded)[:, :-1], atol=1e-6, rtol=0)
    set_bidirectional(enc.model, False)
    assert not enc.bidirectional
    for mask in (full, padded):
        h = states(mask)
        torch.testing.assert_close(h[0, :5], h[1, :5], atol=1e-6, rtol=0)


def test_bidirectional_false_loads_causal(tiny_dirs):
    enc = LLMTextEncoder.from_pretrained(tiny_dirs["llama"], bidirectional=False, device="cpu")
    assert not enc.bidirectional


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_padding_does_not_change_embeddings(encoders, family):
    """Padding is masked in attention and pooling: a caption alone and in a padded batch agree."""
    enc = encoders[family]
    alone = torch.cat([enc.encode([c], show_progress=False) for c in CAPTIONS])
    batched = enc.encode(CAPTIONS, batch_size=4, show_progress=False)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_instruction_is_attended_but_not_pooled(encoders):
    base = encoders["llama"]
    enc = LLMTextEncoder(base.model, base.tokenizer, instruction=INSTRUCTION)
    batch = enc.tokenize(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        ids = batch["input_ids"][i]
        attended, pooled = batch["attention_mask"][i].bool(), batch["embed_mask"][i].bool()
        # llm2vec 0.2.3: the pooled positions are the last n of the row, n = the caption's token count
        # when tokenised alone (BPE may split the boundary differently in context).
        n = len(enc.tokenizer(caption, add_special_tokens=False)["input_ids"])
        assert pooled.sum().item() == n
        assert torch.equal(ids[attended][-n:], ids[pooled])
        # Attended but not pooled: BOS + the instruction.
        skipped = ids[attended & ~pooled]
        assert skipped[0] == enc.tokenizer.bos_token_id
        assert enc.tokenizer.decode(ids[attended][1:]) == INSTRUCTION.strip() + " " + caption
    assert torch.all(batch["embed_mask"] <= batch["attention_mask"])
    # The embedding is the mean over exactly those positions of states that attended the instruction.
    with torch.no_grad():
        h = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        emb = enc(batch["input_ids"], batch["attention_mask"], batch["embed_mask"])
    m = batch["embed_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(emb, (h * m).sum(1) / m.sum(1), atol=1e-6, rtol=1e-5)
    no_instr = LLMTextEncoder(enc.model, enc.tokenizer).encode(CAPTIONS, show_progress=False)
    assert not torch.allclose(emb, no_instr, atol=1e-4), "the instruction must be attended"


def test_last_token_pooling_and_normalize(encoders):
    base = encoders["mistral"]
    enc = LLMTextEncoder(base.model, base.tokenizer, pooling="last_token", normalize=True)
    batch = enc.tokenize(CAPTIONS)
    with torch.no_grad():
        h = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1  # tokenize pads on the right
    want = torch.nn.functional.normalize(h[torch.arange(4), last], dim=-1)
    got = enc.encode(CAPTIONS, show_progress=False)
    order = enc.length_order(CAPTIONS)
    assert order[0] == 2 and order[-1] == 3  # longest first
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4))


def test_forward_has_gradients_for_training(encoders):
    enc = encoders["gemma"]
    batch = enc.tokenize(CAPTIONS[:2])
    emb = enc(**batch)
    assert emb.dtype == torch.float32 and emb.shape == (2, enc.embedding_dim)
    params = [p for p in enc.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(emb.pow(2).sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_save_and_restore_settings(tiny_dirs, tmp_path):
    enc = LLMTextEncoder.from_pretrained(tiny_dirs["qwen2"], instruction=INSTRUCTION, max_length=40,
                                         pooling="mean", normalize=True, device="cpu")
    out = enc.save_pretrained(tmp_path / "saved")
    saved = json.loads((out / ENCODER_CONFIG_NAME).read_text())
    assert saved["instruction"] == INSTRUCTION and saved["max_length"] == 40 and saved["bidirectional"]
    back = LLMTextEncoder.from_pretrained(out, device="cpu")
    assert (back.instruction, back.max_length, back.normalize) == (INSTRUCTION, 40, True)
    assert back.bidirectional
    torch.testing.assert_close(back.encode(CAPTIONS, show_progress=False),
                               enc.encode(CAPTIONS, show_progress=False))


def test_lora_applied_and_merged(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model

    enc = LLMTextEncoder.from_pretrained(tiny_dirs["llama"], device="cpu")
    base = enc.encode(CAPTIONS, show_progress=False)
    peft_model = get_peft_model(enc.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    tuned = LLMTextEncoder(peft_model, enc.tokenizer).encode(CAPTIONS, show_progress=False)
    assert not torch.allclose(tuned, base, atol=1e-4)
    applied = LLMTextEncoder.from_pretrained(tiny_dirs["llama"], lora=tmp_path / "adapter", device="cpu")
    assert applied.has_unmerged_lora and applied.bidirectional
    torch.testing.assert_close(applied.encode(CAPTIONS, show_progress=False), tuned, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unmerged LoRA"):
        applied.save_pretrained(tmp_path / "nope")
    applied.merge_lora()
    assert not applied.has_unmerged_lora and applied.bidirectional
    torch.testing.assert_close(applied.encode(CAPTIONS, show_progress=False), tuned, atol=1e-5, rtol=1e-4)


def test_8bit_matches_full_precision(tmp_path):
    folder = build_tiny_llm(tmp_path / "llama128", "llama", hidden_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, seed=1)
    full = LLMTextEncoder.from_pretrained(folder, device="cpu")
    int8 = LLMTextEncoder.from_pretrained(folder, load_in_8bit=True, device="cpu")
    assert any("Int8" in type(m).__name__ or "8bit" in type(m).__name__ for m in int8.model.modules())
    assert int8.model.get_memory_footprint() < full.model.get_memory_footprint()
    a = full.encode(CAPTIONS, show_progress=False)
    b = int8.encode(CAPTIONS, show_progress=False)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min().item() >= 0.99, cos


def test_packaged_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    path = packaged_minilm_path()
    st = SentenceTransformer(str(path), device="cpu")
    want = st.encode(CAPTIONS, convert_to_tensor=True, normalize_embeddings=False).float()
    enc = LLMTextEncoder.from_pretrained(path, normalize=True, device="cpu")
    assert enc.max_length == 256 and enc.embedding_dim == 384 and enc.bidirectional
    got = enc.encode(CAPTIONS, batch_size=3, show_progress=False)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_bad_arguments_raise(tiny_dirs, encoders, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        LLMTextEncoder.from_pretrained(str(tmp_path / "missing-model"))
    with pytest.raises(ValueError, match="pooling must be one of"):
        LLMTextEncoder.from_pretrained(tiny_dirs["llama"], pooling="max", device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        LLMTextEncoder.from_pretrained(tiny_dirs["llama"], attn_implementation="flash_attention_2",
                                       device="cpu")
    with pytest.raises(ValueError, match="dtype must be"):
        LLMTextEncoder.from_pretrained(tiny_dirs["llama"], dtype="int4")
    with pytest.raises(ValueError, match="encoder, always bidirectional"):
        LLMTextEncoder.from_pretrained(packaged_minilm_path(), bidirectional=False, device="cpu")
    enc = encoders["llama"]
    with pytest.raises(TypeError, match="single str"):
        enc.encode("one caption")
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(CAPTIONS, batch_size=0)
