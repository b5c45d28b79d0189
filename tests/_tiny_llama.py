"""A 1-layer Llama with a word-level tokenizer and caption pairs over its vocabulary (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a an the small large red green blue circle square cross triangle and , . with on left right of "
         "above below next to").split()


def write_pairs(folder: Path, n: int) -> Path:
    """``n`` (short, long) caption pairs as a JSONL manifest (no images)."""
    colours, shapes = ["red", "green", "blue"], ["circle", "square", "cross", "triangle"]
    rows = []
    for i in range(n):
        c, s, z, other = colours[i % 3], shapes[i % 4], ["small", "large"][i % 2], shapes[(i + 1) % 4]
        rows.append({"key": f"p{i:02d}", "image": f"{i}.png", "short": f"a {c} {s}",
                     "long": f"a {z} {c} {s} next to a {colours[(i + 2) % 3]} {other} on the left ."})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tiny_llama(folder: Path) -> Path:
    """Save the model and tokenizer to ``folder`` (seeded: the same weights every time)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
