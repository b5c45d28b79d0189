"""Prompt templates llm2vec 0.2.3 wraps texts in before tokenising, and detecting which one a model uses.

llm2vec 0.2.3 (``LLM2Vec.prepare_for_tokenization``) wraps the joined ``instruction + caption`` string
of instruction-tuned models in the family's user-turn markup; the caption's own tokens plus the
template's closing token are pooled, the opening markup is attended but not pooled. llm2vec picks the
template from ``model.config._name_or_path`` (an exact hub name); here ``"auto"`` also recognises
the family from the tokenizer (its chat template and special tokens) and the config, so a local copy
or a fine-tune of the same chat model (e.g. LLM2CLIP's released Llama-3 LLM, whose users set
``_name_or_path`` to ``meta-llama/Meta-Llama-3-8B-Instruct`` as a workaround) gets the same format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PromptTemplate:
    """``head + text.strip() + tail`` (llm2vec strips the joined text only when it wraps it)."""

    name: str
    head: str
    tail: str

    def wrap(self, text: str) -> str:
        if self.name == "none":
            return text
        return self.head + text.strip() + self.tail


# Transcribed from llm2vec 0.2.3 ``prepare_for_tokenization`` (mean pooling: no eos suffix).
TEMPLATES: dict[str, PromptTemplate] = {
    "none": PromptTemplate("none", "", ""),
    "llama3": PromptTemplate("llama3", "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    # Mistral-7B-Instruct-v0.2 and Llama-2-7b-chat share the [INST] format.
    "mistral": PromptTemplate("mistral", "[INST] ", " [/INST]"),
    "gemma2": PromptTemplate("gemma2", "<bos><start_of_turn>user\n", "<end_of_turn>"),
    "qwen2": PromptTemplate("qwen2", "<|im_start|>user\n", "<|im_end|>"),
}
ALIASES = {"llama2": "mistral", "llama2-chat": "mistral", "gemma": "gemma2"}
TEMPLATE_CHOICES = ("auto", *TEMPLATES, *ALIASES)

# The exact hub names llm2vec 0.2.3 itself recognises.
_LLM2VEC_NAMES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral",
    "meta-llama/Llama-2-7b-chat-hf": "mistral",
    "google/gemma-2-9b-it": "gemma2",
    "Qwen/Qwen2-1.5B-Instruct": "qwen2",
    "Qwen/Qwen2-7B-Instruct": "qwen2",
}


def get_template(name: str) -> PromptTemplate:
    """The template called ``name`` (not ``"auto"``: resolve that with :func:`detect_template`)."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATE_CHOICES}, got {name!r}")
    return TEMPLATES[key]


def detect_template(tokenizer: Any, config: Any) -> str:
    """Template name of an instruction-tuned decoder, ``"none"`` for base models and encoders.

    Order: the hub names llm2vec 0.2.3 knows (``config._name_or_path``); then the tokenizer's chat
    template markup; then its end-of-turn special token (a chat model's EOS: base Llama-3 ends with
    ``<|end_of_text|>`` and gets no template, as in llm2vec). BERT-like configs always get ``"none"``.
    """
    from .llm_encoder import is_decoder_only

    if config is not None and not is_decoder_only(config):
        return "none"
    name = str(getattr(config, "_name_or_path", "") or "")
    if name in _LLM2VEC_NAMES:
        return _LLM2VEC_NAMES[name]
    chat = getattr(tokenizer, "chat_template", None)
    chat = chat if isinstance(chat, str) else ""
    vocab = set(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else set()
    eos = getattr(tokenizer, "eos_token", None)
    if "<|start_header_id|>" in chat or (eos == "<|eot_id|>" and "<|start_header_id|>" in vocab):
        return "llama3"
    if "<start_of_turn>" in chat or (eos == "<end_of_turn>" and "<start_of_turn>" in vocab):
        return "gemma2"
    if "<|im_start|>" in chat or (eos == "<|im_end|>" and "<|im_start|>" in vocab):
        return "qwen2"
    if "[INST]" in chat:
        return "mistral"
    return "none"


def resolve_template(template: str, tokenizer: Any, config: Any) -> str:
    """``template`` itself (aliases resolved) or, for ``"auto"``, :func:`detect_template`'s answer."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    if template == "auto":
        return detect_template(tokenizer, config)
    return get_template(template).name
