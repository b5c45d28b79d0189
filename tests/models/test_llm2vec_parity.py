"""LLMTextEncoder.encode == llm2vec 0.2.3's LLM2Vec.encode for bidirectional decoders with mean pooling.

The reference is a transcription of llm2vec's code (tests/_llm2vec_0_2_3_reference.py). Tiny
Llama/Mistral models and tokenizers with the special tokens each prompt template needs are built
in memory; nothing is downloaded.
"""

from __future__ import annotations

import pytest
import torch
from _llm2vec_0_2_3_reference import BiModelReference, LLM2VecReference

from llm2clip_fast.models.bidirectional import set_bidirectional
from llm2clip_fast.models.llm_encoder import ENCODER_CONFIG_NAME, LLMTextEncoder
from llm2clip_fast.models.prompt_templates import detect_template

CORPUS = [
    "a photo of a red circle above a small blue square on a white background",
    "two green triangles to the left of a large yellow star, next to an orange hexagon",
    "Given a caption, retrieve a detailed relevant caption: user assistant",
    "[INST] [/INST] The quick brown fox jumps over the lazy dog. 0123456789 ; ! ? ( ) @ # $ % ^ & *",
]
CAPTIONS = [
    "a red circle above a blue square",
    "star",
    "  two green triangles to the left of a large yellow star, next to an orange hexagon and a circle  ",
    "an image with one tiny pink heart",
    "a photo of a red circle above a small blue square on a white background " * 4,  # truncated
    "blue",
]
INSTRUCTION = "  Given a caption, retrieve a detailed relevant caption: "
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|end_of_text|>"]
NAMES = {"llama3": "meta-llama/Meta-Llama-3-8B-Instruct", "mistral": "mistralai/Mistral-7B-Instruct-v0.2",
         "qwen2": "Qwen/Qwen2-1.5B-Instruct", "none": "tiny/base-model"}


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "llama3":
        bos, eos, specials = "<|begin_of_text|>", "<|eot_id|>", LLAMA3_SPECIAL
        chat = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n" \
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
    elif kind == "qwen2":  # no BOS, like Qwen's own tokenizer
        bos, eos, specials = None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        chat = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    else:
        bos, eos, specials = "<s>", "</s>", ["<s>", "</s>"]
        chat = None
        if kind == "mistral":
            chat = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   additional_special_tokens=[s for s in specials if s not in (bos, eos)])
    if chat:
        fast.chat_template = chat
    return fast


def _model(family: str, vocab: int, name: str):
    from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel, Qwen2Config, Qwen2Model

    cls_cfg, cls_model = {"llama": (LlamaConfig, LlamaModel), "mistral": (MistralConfig, MistralModel),
                          "qwen2": (Qwen2Config, Qwen2Model)}[family]
    cfg = cls_cfg(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    model = cls_model(cfg).eval()
    model.config._name_or_path = name
    return model


CASES = [("llama", "llama3"), ("llama", "none"), ("mistral", "mistral"), ("mistral", "none"),
         ("qwen2", "qwen2")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{t}" for f, t in CASES])
def pair(request):
    family, template = request.param
    tok = _tokenizer(template if template != "none" else "base")
    model = _model(family, len(tok), NAMES[template])
    return family, template, model, tok


def _ours(model, tok, **kw):
    set_bidirectional(model, True)
    return LLMTextEncoder(model, tok, pooling="mean", **kw)


@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["plain", "instruction"])
def test_encode_matches_llm2vec(pair, instruction):
    _, template, model, tok = pair
    ours = _ours(model, tok, max_length=44, doc_max_length=40, instruction=instruction)
    if instruction:
        assert max(ours.token_lengths(CAPTIONS)) == 44, "the cases must include a truncated row"
    assert ours.template == template  # "auto": from the config's hub name, as llm2vec decides
    ref = LLM2VecReference(BiModelReference(model), tok, pooling_mode="mean", max_length=44,
                           doc_max_length=40)
    sentences = [[instruction or "", t] for t in CAPTIONS]
    want = ref.encode(sentences, batch_size=4, device="cpu")
    got = ours.encode(CAPTIONS, batch_size=3, show_progress=False)
    assert got.dtype == want.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5


def test_last_token_pooling_matches_llm2vec(pair):
    _, _, model, tok = pair
    ours = _ours(model, tok, max_length=44, doc_max_length=40, instruction=INSTRUCTION)
    ours.pooling = "last_token"
    ref = LLM2VecReference(BiModelReference(model), tok, pooling_mode="last_token", max_length=44,
                           doc_max_length=40)
    want = ref.encode([[INSTRUCTION, t] for t in CAPTIONS], batch_size=4, device="cpu")
    got = ours.encode(CAPTIONS, batch_size=3, show_progress=False)
    assert (got - want).abs().max().item() <= 1e-5


def test_pooled_positions_are_llm2vecs(pair):
    """The pooled tokens are llm2vec's embed_mask tokens; BOS, template head, instruction only attended."""
    _, template, model, tok = pair
    ours = _ours(model, tok, max_length=44, doc_max_length=40, instruction=INSTRUCTION)
    ref = LLM2VecReference(BiModelReference(model), tok, max_length=44, doc_max_length=40)
    texts = [ref.prepare_for_tokenization(ref._convert_to_str(INSTRUCTION, t)) for t in CAPTIONS]
    feats = ref.tokenize(texts)
    mine = ours.tokenize(CAPTIONS)
    for i in range(len(CAPTIONS)):
        want_ids = feats["input_ids"][i][feats["attention_mask"][i].bool()]
        want_pool = feats["input_ids"][i][feats["embed_mask"][i].bool()]
        got_ids = mine["input_ids"][i][mine["attention_mask"][i].bool()]
        got_pool = mine["input_ids"][i][mine["embed_mask"][i].bool()]
        assert torch.equal(got_ids, want_ids) and torch.equal(got_pool, want_pool)
        if tok.bos_token_id is not None:
            assert got_ids[0].item() == tok.bos_token_id and tok.bos_token_id not in got_pool.tolist()
        if template == "llama3" and len(got_ids) < 44:  # a truncated row loses its <|eot_id|>
            assert got_pool[-1].item() == tok.convert_tokens_to_ids("<|eot_id|>")


# Few words, many tokens each (strings the tokenizer never saw: one token per byte): the caption passes
# doc_max_length while max_length does not cut it first, so llm2vec's word cut has to act.
DENSE = ["xqzjv wkpyq zzxqv jqkzx", "a vkqzw bxqjv", "blue"]


@pytest.mark.timeout(120)
def test_doc_max_length_cuts_token_dense_captions_by_words_like_llm2vec(pair, monkeypatch):
    """llm2vec cuts a caption over doc_max_length tokens to int(words * doc_max_length / tokens) words
    until it fits; a cut counted in tokens instead never shortens a caption of fewer words than
    doc_max_length and loops forever. Bounded here by counting the tokenizer passes."""
    _, _, model, tok = pair
    ours = _ours(model, tok, max_length=128, doc_max_length=12)
    ref = LLM2VecReference(BiModelReference(model), tok, max_length=128, doc_max_length=12)
    counts = ours._caption_token_counts(DENSE)
    assert counts[0] > 12 and counts[0] < 128 and len(DENSE[0].split()) < 12  # reaches doc_max_length only

    real, calls = ours._caption_token_counts, {"n": 0}

    def counted(texts):
        calls["n"] += 1
        if calls["n"] > 20:
            raise AssertionError("the doc_max_length cut does not converge")
        return real(texts)

    monkeypatch.setattr(ours, "_caption_token_counts", counted)
    cut = ours._shorten(DENSE)
    want = [ref._convert_to_str("", t).removeprefix("!@#$%^&*()") for t in DENSE]
    assert cut == want and cut[0] != DENSE[0]  # llm2vec's own cut, which really shortened the first
    monkeypatch.undo()
    got = ours.encode(DENSE, batch_size=2, show_progress=False)
    expected = ref.encode([["", t] for t in DENSE], batch_size=2, device="cpu")
    assert (got - expected).abs().max().item() <= 1e-5


def test_padding_side_and_batch_do_not_matter(pair):
    """Mixed lengths in one batch: each row equals that text encoded alone, and llm2vec's left padding."""
    _, _, model, tok = pair
    ours = _ours(model, tok, max_length=64, instruction=INSTRUCTION)
    together = ours.encode(CAPTIONS, batch_size=len(CAPTIONS), show_progress=False)
    alone = torch.cat([ours.encode([t], show_progress=False) for t in CAPTIONS])
    assert (together - alone).abs().max().item() <= 1e-5
    batch = ours.tokenize(CAPTIONS)
    assert batch["attention_mask"].sum(1).unique().numel() > 2  # really mixed lengths
    # The same rows padded on the left (llm2vec's side) through the same bidirectional model.
    lengths = batch["attention_mask"].sum(1)
    L = batch["input_ids"].shape[1]
    left = {k: torch.zeros_like(v) for k, v in batch.items()}
    for i, n in enumerate(lengths.tolist()):
        for k in batch:
            left[k][i, L - n:] = batch[k][i, :n]
    with torch.no_grad():
        right_emb = ours(batch["input_ids"], batch["attention_mask"], batch["embed_mask"])
        left_emb = ours(left["input_ids"], left["attention_mask"], left["embed_mask"])
    assert (right_emb - left_emb).abs().max().item() <= 1e-5


def test_template_auto_from_tokenizer_and_explicit_choice():
    tok3, tokm, base = _tokenizer("llama3"), _tokenizer("mistral"), _tokenizer("base")
    local = _model("llama", len(tok3), "/some/local/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned")
    assert detect_template(tok3, local.config) == "llama3"  # chat template markup, no hub name needed
    assert detect_template(tokm, local.config) == "mistral"
    assert detect_template(base, local.config) == "none"
    assert LLMTextEncoder(local, tok3, template="none").template == "none"
    assert LLMTextEncoder(local, base, template="llama2-chat").template == "mistral"
    with pytest.raises(ValueError, match="template must be one of"):
        LLMTextEncoder(local, base, template="vicuna")
    # issue 27: "auto" is llm2vec 0.2.3's exact-name rule (this local name matches none of its names);
    # LLM2CLIP's own copy of llm2vec ("llm2clip") matches "Llama-3" and "Instruct" in it
    assert LLMTextEncoder(local, tok3).template == "none"
    full, pooled = LLMTextEncoder(local, tok3, instruction=INSTRUCTION,
                                  template="llm2clip").llm2vec_strings(["a dog "])
    assert full == ["<|start_header_id|>user<|end_header_id|>\n\n"
                    "Given a caption, retrieve a detailed relevant caption: a dog<|eot_id|>"]
    assert pooled == ["a dog<|eot_id|>"]


def test_template_saved_and_restored(tmp_path):
    tok = _tokenizer("llama3")
    # the hub name llm2vec 0.2.3 gives the Llama-3 format ("auto" follows llm2vec's rule, issue 27)
    model = _model("llama", len(tok), "meta-llama/Meta-Llama-3-8B-Instruct")
    enc = _ours(model, tok, doc_max_length=77)
    assert enc.template == "llama3"
    enc.save_pretrained(tmp_path / "enc")
    import json

    saved = json.loads((tmp_path / "enc" / ENCODER_CONFIG_NAME).read_text())
    assert saved["template"] == "llama3" and saved["doc_max_length"] == 77
    back = LLMTextEncoder.from_pretrained(tmp_path / "enc", device="cpu")
    assert back.template == "llama3" and back.doc_max_length == 77
    assert LLMTextEncoder.from_pretrained(tmp_path / "enc", device="cpu", template="none").template == "none"
    torch.testing.assert_close(back.encode(CAPTIONS[:3], show_progress=False),
                               enc.encode(CAPTIONS[:3], show_progress=False), atol=1e-5, rtol=0)


def test_encoder_models_refuse_templates():
    from llm2clip_fast.models.llm_encoder import packaged_minilm_path

    try:
        path = packaged_minilm_path()
    except FileNotFoundError:
        pytest.skip("packaged MiniLM not installed")
    with pytest.raises(ValueError, match="sentence-transformers"):
        LLMTextEncoder.from_pretrained(path, device="cpu", template="llama3")
    assert LLMTextEncoder.from_pretrained(path, device="cpu").template == "none"


def test_template_flag_on_embed_stage1_eval_and_recorded_in_cache(tmp_path):
    import argparse
    import json as _json

    from llm2clip_fast.data.embedding_cache import EmbeddingCache
    from llm2clip_fast.train import eval as eval_cmd
    from llm2clip_fast.train import stage1
    from llm2clip_fast.train.__main__ import main

    tok = _tokenizer("llama3")
    folder = tmp_path / "llm"
    _model("llama", len(tok), "tiny/local").save_pretrained(folder)
    tok.save_pretrained(folder)
    # a local copy of Meta-Llama-3-8B-Instruct as transformers 4.x saved it: config.json names it, which is
    # what llm2vec 0.2.3 (and "auto", issue 27) reads for a local folder
    config = _json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    (folder / "config.json").write_text(_json.dumps(config))
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(_json.dumps({"key": f"k{i}", "image": f"k{i}.png", "long": c, "short": c[:9]})
                                + "\n" for i, c in enumerate(CAPTIONS[:4])))
    for template in ("auto", "none"):
        out = tmp_path / f"cache-{template}"
        assert main(["embed", "--llm", str(folder), "--data", str(manifest), "--out", str(out), "--dtype",
                     "fp32", "--precision", "fp32", "--captions", "long", "--template", template,
                     "--quiet"]) == 0
        cache = EmbeddingCache.open(out)
        resolved = "llama3" if template == "auto" else "none"
        assert cache.metadata["template"] == resolved and cache.metadata["doc_max_length"] == 400
        want = LLMTextEncoder.from_pretrained(folder, device="cpu", template=resolved).encode(
            CAPTIONS[:4], show_progress=False)
        torch.testing.assert_close(cache.lookup(cache.keys(), "long"), want, atol=1e-5, rtol=1e-5)
    for add in (stage1.add_arguments, eval_cmd.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        required = {"--llm": "x", "--data": "x", "--out": "x"} if add is stage1.add_arguments else \
            {"--model": "x", "--data": "x"}
        argv = [a for kv in required.items() for a in kv]
        assert parser.parse_args([*argv, "--template", "mistral"]).template == "mistral"
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--template", "vicuna"])
