"""Tiny random-weight decoder LLMs saved as ordinary ``transformers`` folders, built offline.

For tests, benchmarks and demos that need a Llama/Mistral/Qwen2/Gemma-shaped model without
downloading one: the config is scaled down, the weights are random (seeded) and the tokenizer is a
small byte-level BPE trained in memory (every string encodes; no unknown tokens). Like Llama's own
tokenizer it adds a BOS token and has no pad token.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
_CORPUS = [
    "a photo of a red circle above a small blue square on a white background",
    "two green triangles to the left of a large yellow star, next to an orange hexagon",
    "the picture shows three purple ellipses below a black cross and a gray diamond",
    "an image with one tiny pink heart in the top right corner and nothing else",
    "Given a caption, retrieve a detailed relevant caption: ",
    "The quick brown fox jumps over the lazy dog. 0123456789, ; ! ? ( ) - ' \"",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<s>`` (BOS, prepended) and ``</s>`` (EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(family: str, vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None):
    """A scaled-down ``transformers`` config of ``family`` (one of :data:`FAMILIES`)."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), which must divide by "
            f"num_kv_heads ({num_kv_heads})"
        )
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=None,
        tie_word_embeddings=False,
    )
    if family == "gemma":
        kwargs["head_dim"] = hidden_size // num_heads
    return classes[family](**kwargs)


def build_tiny_llm(
    folder: str | os.PathLike,
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    massive_channels: int = 0,
) -> Path:
    """Save a random ``<family>ForCausalLM`` and its tokenizer to ``folder``; returns the folder.

    ``massive_channels``: that many hidden dimensions (spread over the width) of the token embeddings
    are scaled by 100, so the residual stream, and every norm's output, carries LLM-like "massive
    activations" (Sun et al. 2024): the outlier channels that make per-token 8-bit activations lossy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    sizes = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_kv_heads)
    tiny_config(family, len(tokenizer), **sizes).save_pretrained(out)
    tokenizer.save_pretrained(out)
    # AutoTokenizer may pick a family's own tokenizer class, which can add special tokens (Qwen2 adds
    # a pad token): size the embedding table for the tokenizer users will actually load.
    vocab = len(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab, **sizes))
    if massive_channels:
        channels = torch.linspace(3, hidden_size - 2, massive_channels).long()
        with torch.no_grad():
            model.get_input_embeddings().weight[:, channels] *= 100.0
    model.save_pretrained(out)
    return out
