"""Stage 1's trainable text encoder: the LLM (8-bit if asked, with its token-prediction head for
MNTP), bidirectional attention on decoders, LoRA on the ``--lora-targets``, wrapped in an
LLMTextEncoder. Stage 1's contrastive phase and its MNTP phase both train it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .lora_targets import resolve_lora_targets
from .mntp import check_head_loaded, prediction_head


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class TrainableEncoder:
    encoder: Any  # LLMTextEncoder around the peft-wrapped base model
    peft_model: nn.Module
    head: nn.Module | None  # MNTP token-prediction head (None without MNTP)
    decoder: bool
    targets: list[str]
    folder: Path


def build_trainable_encoder(args: argparse.Namespace, device: torch.device) -> TrainableEncoder:
    """Load the LLM (8-bit if asked), make it bidirectional, add LoRA, wrap it in an LLMTextEncoder."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models.llm_encoder import LLMTextEncoder, resolve_model_path
    from ..models.llm_family import is_decoder_only

    folder = resolve_model_path(args.llm)
    config = AutoConfig.from_pretrained(folder)
    decoder = is_decoder_only(config)
    if decoder and hasattr(config, "use_cache"):
        config.use_cache = False
    base, head = _load_base_model(args, folder, config, decoder, device)
    if getattr(args, "lora", None):
        from ..models.llm2vec_checkpoints import apply_lora_chain, normalize_lora_list

        base = apply_lora_chain(base, normalize_lora_list(args.lora), merge_last=True)
    base, targets = _prepare_base_for_lora(args, base, decoder)
    peft_model = _add_lora(args, base, targets)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from ..models.prompt_templates import llm2vec_name_or_path

    encoder = LLMTextEncoder(peft_model, tokenizer, pooling=args.pooling, max_length=args.max_length,
                             instruction=args.instruction, template=getattr(args, "template", "auto"),
                             doc_max_length=getattr(args, "doc_max_length", 400),
                             name_or_path=llm2vec_name_or_path(str(args.llm), folder))
    return TrainableEncoder(encoder, peft_model, head, decoder, targets, folder)


def _load_base_model(args: argparse.Namespace, folder: Path, config: Any, decoder: bool,
                     device: torch.device) -> tuple[nn.Module, nn.Module | None]:
    """(base model, frozen token-prediction head or None) on ``device``, in ``--dtype`` (LLM.int8 with
    ``--load-in-8bit``). With ``--mntp-steps`` the model is loaded with its LM/MLM head, which MNTP
    needs and whose absence is an error naming the folder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    kwargs: dict[str, Any] = {"dtype": _resolve_dtype(args.dtype, device)}
    if args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = "cpu" if device.type == "cpu" else {"": device}
    head = None
    if args.mntp_steps:
        cls = AutoModelForCausalLM if decoder else AutoModelForMaskedLM
        try:
            full, info = cls.from_pretrained(folder, config=config, output_loading_info=True, **kwargs)
        except ValueError as exc:
            raise ValueError(f"--mntp-steps: {folder} cannot be loaded with a token-prediction head "
                             f"({cls.__name__}): {exc}") from exc
        check_head_loaded(full, list(info.get("missing_keys", [])), str(folder))
        head = prediction_head(full, decoder=decoder)
        for p in head.parameters():
            p.requires_grad_(False)
        base = full.base_model
    else:
        base = AutoModel.from_pretrained(folder, config=config, **kwargs)
    if not args.load_in_8bit:  # an 8-bit model was placed by its device_map
        base.to(device)
        if head is not None:
            head.to(device)
    return base, head


def _prepare_base_for_lora(args: argparse.Namespace, base: nn.Module,
                           decoder: bool) -> tuple[nn.Module, list[str]]:
    """Bidirectional attention (decoders), the LoRA target modules (``--lora-targets``), every base
    weight frozen, and the 8-bit preparation or gradient checkpointing asked for."""
    from peft import prepare_model_for_kbit_training

    from ..models.bidirectional import set_bidirectional

    if decoder:
        set_bidirectional(base, True)
    targets = resolve_lora_targets(base, [t for t in args.lora_targets.split(",")])
    for p in base.parameters():
        p.requires_grad_(False)
    gc_kwargs = {"use_reentrant": False}
    if args.load_in_8bit:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=args.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=gc_kwargs)
    elif args.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    return base, targets


def _add_lora(args: argparse.Namespace, base: nn.Module, targets: list[str]) -> nn.Module:
    """The peft model: LoRA (``--lora-r/-alpha/-dropout``) on ``targets``, initialised from ``--seed``."""
    from peft import LoraConfig, get_peft_model

    # Identical LoRA initialisation on every rank.
    torch.manual_seed(args.seed)
    # A BERT pooler's "dense" matches the targets but never feeds mean pooling: no adapter there.
    unused = [n for n, _ in base.named_modules() if n == "pooler" or n.startswith("pooler.")]
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets, exclude_modules=unused or None, bias="none")
    return get_peft_model(base, lora)
