"""Masked next-token prediction (MNTP), llm2vec's warm-up for a decoder made bidirectional.

A fraction of each caption's tokens is replaced by a mask token (the tokenizer's mask token, else
its unk token, else its pad token) and the model, attending both ways, must recover them. A decoder
keeps its next-token head: token ``i`` is predicted from the hidden state at position ``i - 1``
(so position 0 is never masked). An encoder with a masked-LM head predicts token ``i`` at ``i``.
The head stays frozen; only the LoRA adapters learn.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def mask_token_id(tokenizer: Any) -> int:
    """The id masked positions get: mask token, else unk, else pad (as llm2vec falls back)."""
    for name in ("mask_token_id", "unk_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(tokenizer).__name__} has no mask, unk or pad token to mask captions with")


def mask_captions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_id: int,
    special_ids: set[int],
    probability: float,
    generator: torch.Generator,
    decoder: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``probability`` of each caption's ordinary tokens.

    input_ids, attention_mask: (B, L). special_ids: ids never masked (BOS, CLS, SEP, ...).
    decoder: position 0 has no predecessor, so it is never masked. Returns ``(masked_ids, labels)``,
    labels (B, L) int64 holding the original id where masked and IGNORE_INDEX elsewhere. At least one
    token per batch is masked (the first candidate) so the loss is always defined.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"MNTP mask probability must be in (0, 1), got {probability}")
    candidates = attention_mask.bool()
    if special_ids:
        candidates &= ~torch.isin(input_ids, torch.tensor(sorted(special_ids), device=input_ids.device))
    if decoder:
        candidates[:, 0] = False
    if not candidates.any():
        raise ValueError("no caption token can be masked (captions are empty or only special tokens)")
    draw = torch.rand(input_ids.shape, generator=generator, device="cpu").to(input_ids.device)
    masked = candidates & (draw < probability)
    if not masked.any():
        first = candidates.flatten().nonzero()[0]
        masked.view(-1)[first] = True
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids), labels


def mntp_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, *, decoder: bool) -> torch.Tensor:
    """Cross-entropy of the masked tokens; the head runs only on the positions that predict one.

    hidden: (B, L, H) last hidden states of the masked input. labels: (B, L) from
    :func:`mask_captions`. head: maps (N, H) to (N, V) logits.
    """
    if decoder:
        # The state at i-1 predicts token i.
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    picked = labels != IGNORE_INDEX
    logits = head(hidden[picked])
    return F.cross_entropy(logits.float(), labels[picked])


def prediction_head(full_model: nn.Module, *, decoder: bool) -> nn.Module:
    """The token-prediction head of a ``...ForCausalLM`` / ``...ForMaskedLM`` model."""
    if decoder:
        head = full_model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(full_model).__name__} has no output head for MNTP")
        return head
    for name in ("cls", "lm_head"):  # BERT-like / RoBERTa-like masked-LM heads
        head = getattr(full_model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"MNTP on {type(full_model).__name__}: cannot find its masked-LM head (cls or lm_head)")


def check_head_loaded(full_model: nn.Module, missing_keys: list[str], path: str) -> None:
    """Refuse MNTP when the checkpoint carries no trained head (it would be random)."""
    prefix = getattr(full_model, "base_model_prefix", "")
    head_missing = [k for k in missing_keys if not (prefix and k.startswith(prefix + "."))]
    if head_missing:
        raise ValueError(
            f"--mntp-steps needs a trained token-prediction head, but {path} has no weights for "
            f"{', '.join(head_missing[:4])}{' ...' if len(head_missing) > 4 else ''} "
            "(e.g. a sentence-embedding "
            "checkpoint saved without its masked-LM head); drop --mntp-steps"
        )
