"""Which linear layers get LoRA adapters: the recipe's q/k/v/o/gate/up/down, mapped per model family.

LLM2CLIP puts LoRA on every attention and MLP projection. Decoder families name them alike
(Llama, Mistral, Qwen2/3, Gemma: ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``);
BERT-like encoders call them ``query key value`` and ``dense`` (attention output, intermediate and
output all end in ``dense``). Requests are module-name suffixes, as peft matches them; a name that
matches no linear layer is refused with the list of names that would.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# BERT/RoBERTa/MiniLM ("dense" = attention output, intermediate (up) and output (down) projections).
BERT_TARGETS = ("query", "key", "value", "dense")
# Other encoders with their own names: DistilBERT, MPNet/ModernBERT-style fused projections.
OTHER_TARGETS = ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "q", "k", "v", "o", "Wqkv", "Wo",
                 "Wi", "qkv_proj", "gate_up_proj")


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # bitsandbytes Linear8bitLt / Linear4bit subclass nn.Linear; anything else peft knows by name.
    return type(module).__name__ in {"Linear8bitLt", "Linear4bit", "Conv1D"}


def linear_module_names(model: nn.Module, *, exclude_output_head: bool = True) -> list[str]:
    """Distinct last name components of the model's linear layers, sorted (what LoRA can target).

    The output head (``lm_head``, ``cls.predictions.decoder``) is left out by default: it maps to the
    vocabulary and is never a LoRA target here.
    """
    names = set()
    for full_name, module in model.named_modules():
        if not full_name or not _is_linear(module):
            continue
        last = full_name.rsplit(".", 1)[-1]
        if exclude_output_head and (last in {"lm_head", "decoder"} or ".predictions." in full_name):
            continue
        names.add(last)
    return sorted(names)


def resolve_lora_targets(model: nn.Module, requested: Sequence[str] | None) -> list[str]:
    """The LoRA target names for ``model``.

    requested: explicit module-name suffixes, or None / ["auto"] for the recipe's projections in this
    model's naming (decoder names, then BERT names, then other known encoders' names, whichever the
    model has). Raises ValueError naming the unknown targets and listing the model's linear layers.
    """
    available = linear_module_names(model)
    if not available:
        raise ValueError(f"{type(model).__name__} has no linear layers to put LoRA adapters on")
    if requested is None or list(requested) == ["auto"]:
        for family in (DECODER_TARGETS, BERT_TARGETS, OTHER_TARGETS):
            found = [n for n in family if n in available]
            if found:
                return found
        raise ValueError(
            f"cannot choose LoRA targets for {type(model).__name__} automatically; pass --lora-targets "
            f"with some of its linear layers: {', '.join(available)}"
        )
    requested = [str(n).strip() for n in requested if str(n).strip()]
    if not requested:
        raise ValueError("--lora-targets is empty; name linear layers or use 'auto'")
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise ValueError(
            f"unknown LoRA target module(s) {', '.join(unknown)} for {type(model).__name__}; "
            f"its linear layers are: {', '.join(available)}"
        )
    return list(dict.fromkeys(requested))
