"""Prompt templates llm2vec 0.2.3 wraps texts in before tokenising, and which one a model gets.

llm2vec 0.2.3 (``LLM2Vec.prepare_for_tokenization``) wraps the joined ``instruction + caption`` string
of instruction-tuned models in the family's user-turn markup; the caption's own tokens plus the
template's closing token are pooled, the opening markup is attended but not pooled.

Which template (``template=``, ``--template``):

- ``auto`` (the default): exactly llm2vec 0.2.3's choice. ``prepare_for_tokenization`` compares
  ``model.config._name_or_path`` with a few hub names (an exact match); ``LLM2Vec.from_pretrained``
  leaves that the name as given for a hub id and, for a local folder, sets it to the ``_name_or_path``
  field of the folder's ``config.json`` (absent: ``""``, no template) -- :func:`llm2vec_name_or_path`.
- ``llm2clip``: the choice of LLM2CLIP's own modified copy (microsoft/LLM2CLIP ``llm2clip/llm2vec/
  llm2vec.py`` at commit cba3b45ba3d9): the Llama-3 format for any name containing both ``Llama-3``
  and ``Instruct``, the Phi-3.5 format for ``microsoft/Phi-3.5-mini-instruct``, else llm2vec's exact
  names; and for LLM2CLIP's released LLM (a folder whose config names an llm2vec encoder class) the
  name ``meta-llama/Meta-Llama-3-8B-Instruct``, which ``llm2clip/data/extract_embedding.py`` forces
  before extracting (``llm_model.config._name_or_path = ...  # Workaround for LLM2VEC``).
- ``chat``: recognise the family from the tokenizer (its chat template markup and end-of-turn token)
  when llm2vec's names do not match: for local copies or fine-tunes whose config names no hub model.
- a template by name: ``none``, ``llama3``, ``mistral``, ``gemma2``, ``qwen2``, ``phi3``.
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
    # LLM2CLIP's copy only (microsoft/Phi-3.5-mini-instruct).
    "phi3": PromptTemplate("phi3", "<|user|>\n", "<|end|>\n"),
}
ALIASES = {"llama2": "mistral", "llama2-chat": "mistral", "gemma": "gemma2"}
# Rules rather than templates: resolved to one of TEMPLATES when an encoder is built.
RULES = ("auto", "llm2clip", "chat")
TEMPLATE_CHOICES = (*RULES, *TEMPLATES, *ALIASES)

# The exact hub names llm2vec 0.2.3 itself recognises.
_LLM2VEC_NAMES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistral",
    "meta-llama/Llama-2-7b-chat-hf": "mistral",
    "google/gemma-2-9b-it": "gemma2",
    "Qwen/Qwen2-1.5B-Instruct": "qwen2",
    "Qwen/Qwen2-7B-Instruct": "qwen2",
}


# The name LLM2CLIP's extraction forces on its released Llama-3 LLM (llm2clip/data/extract_embedding.py).
LLM2CLIP_EXTRACTION_NAME = "meta-llama/Meta-Llama-3-8B-Instruct"
# LLM2CLIP's caption encoding (llm2clip/data/extract_embedding.py at cba3b45ba3d9: LLM2Vec(...,
# max_length=512, doc_max_length=512), the Llama-3 template its forced name selects): the defaults of
# embed's and eval's ``--recipe llm2clip`` and of a converted LLM2CLIP checkpoint's recorded LLM.
LLM2CLIP_ENCODING = {"max_length": 512, "doc_max_length": 512, "template": "llm2clip"}


def llm2vec_name_or_path(path: str, folder: Any = None) -> str:
    """The ``model.config._name_or_path`` llm2vec 0.2.3 compares for ``LLM2Vec.from_pretrained(path)``:
    for a local folder the ``_name_or_path`` field of its ``config.json`` (``""`` when it has none), for
    anything else (a hub id) ``path`` as given. ``folder``: where the files are (default ``path``)."""
    import json
    import os

    text = os.fspath(path)
    if os.path.isdir(text):
        config_file = os.path.join(os.fspath(folder or text), "config.json")
        try:
            with open(config_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return ""
        value = data.get("_name_or_path", "") if isinstance(data, dict) else ""
        return value if isinstance(value, str) else ""
    return text


def llm2vec_template(name: str) -> str:
    """llm2vec 0.2.3's template for ``_name_or_path`` ``name`` (mean pooling): an exact match, else none."""
    return _LLM2VEC_NAMES.get(name, "none")


def llm2clip_template(name: str) -> str:
    """LLM2CLIP's modified copy's template for ``_name_or_path`` ``name`` (see the module docstring)."""
    if "Llama-3" in name and "Instruct" in name:
        return "llama3"
    if name == "microsoft/Phi-3.5-mini-instruct":
        return "phi3"
    return _LLM2VEC_NAMES.get(name, "none")


def get_template(name: str) -> PromptTemplate:
    """The template called ``name`` (not a rule such as ``"auto"``: see :func:`resolve_template`)."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATE_CHOICES}, got {name!r}")
    return TEMPLATES[key]


def detect_template(tokenizer: Any, config: Any) -> str:
    """The ``chat`` rule: template name of an instruction-tuned decoder, ``"none"`` for base models and
    encoders.

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


def resolve_template(template: str, tokenizer: Any, config: Any, name_or_path: str | None = None) -> str:
    """``template`` itself (aliases resolved) or what a rule chooses (see the module docstring).

    ``name_or_path``: the ``_name_or_path`` llm2vec would compare (:func:`llm2vec_name_or_path`); None
    takes ``config._name_or_path`` (a model built in memory, as llm2vec would see it). Encoders
    (BERT-like configs) always get ``"none"``.
    """
    from .llm_encoder import is_decoder_only

    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")
    if template not in RULES:
        return get_template(template).name
    if config is not None and not is_decoder_only(config):
        return "none"
    if template == "chat":
        return detect_template(tokenizer, config)
    name = name_or_path if name_or_path is not None else str(getattr(config, "_name_or_path", "") or "")
    return llm2vec_template(name) if template == "auto" else llm2clip_template(name)
