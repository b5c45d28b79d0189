"""Model FLOPs of one stage-2 training step, for model FLOPs utilisation (MFU).

The formula (forward + backward, recomputation not counted, multiply-add = 2 FLOPs)::

    F_step = 3 * B_local * (F_tower + F_proj + F_text)  +  6 * B_local * B_global * E

    F_tower = 2 * T * W_tower + 4 * L * T^2 * d_attn     (per image, forward)
    F_proj  = 2 * h * E                                   (visual projection, per image)
    F_text  = 2 * W_adapter                               (text adapter, per caption; CLIP text tower:
                                                           2 * 77 * W_text + 4 * L_text * 77^2 * width)

with T tokens per image, W_tower the weights of the tower's Linear layers (each applied at every token)
and of its patch embedding (per patch), L layers of attention width d_attn (QK^T and AV), h the tower's
pooled width, E the embedding size, B_local this rank's images per step, B_global the images whose
features the loss compares them with (all ranks, all micro-batches). Backward counts twice the forward
(the usual ``6 N`` convention); the contrastive loss counts one logit GEMM forward and two backward
(``6 B_local B_global E``), whatever the implementation does (a fused loss that recomputes the logits does
8 instead of 6: that recomputation is not model work).

MFU = F_step / step seconds / the machine's measured dense matmul rate in the step's dtype (measured in
the same run; bench/stage2_throughput.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

CLIP_TEXT_CONTEXT = 77


def _linear_weights(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def text_flops_per_sample(model: Any) -> int:
    """Forward FLOPs of the text side for one caption (adapter on a cached embedding, or the CLIP text
    tower on a 77-token context)."""
    if model.config.text_tower == "llm-adapter":
        return 2 * _linear_weights(model.text_adapter)
    tower = model.clip_text
    cfg = model.config.clip_text
    width, layers = int(cfg["width"]), int(cfg["layers"])
    return 2 * CLIP_TEXT_CONTEXT * _linear_weights(tower) + 4 * layers * CLIP_TEXT_CONTEXT ** 2 * width


def stage2_step_flops(model: Any, local_batch: int, global_batch: int | None = None) -> dict[str, float]:
    """Model FLOPs of one optimizer step of ``model`` (an LLM2CLIPModel) over ``local_batch`` images on this
    rank, the loss comparing them with ``global_batch`` (default: ``local_batch``) features.

    Returns ``{"tower", "tower_weights", "tower_attention", "projection", "text", "loss", "total"}``, each
    forward + backward, and ``"tower_forward"`` (the tower's forward alone)."""
    global_batch = local_batch if global_batch is None else global_batch
    per_image = model.vision.flops_per_image()
    embed = model.embed_dim
    weights = 3 * local_batch * per_image["weights"]
    attention = 3 * local_batch * per_image["attention"]
    projection = 3 * local_batch * 2 * model.vision.hidden_size * embed
    text = 3 * local_batch * text_flops_per_sample(model)
    loss = 6 * local_batch * global_batch * embed
    tower = weights + attention
    return {"tower": float(tower), "tower_weights": float(weights), "tower_attention": float(attention),
            "tower_forward": float(tower / 3), "projection": float(projection), "text": float(text),
            "loss": float(loss), "total": float(tower + projection + text + loss)}


FORMULA = ("F_step = 3*B_local*(2*T*W_tower + 4*L*T^2*d_attn + 2*h*E + 2*W_adapter) + 6*B_local*B_global*E; "
           "MFU = F_step / step_s / measured matmul FLOP/s (same dtype, same run)")

__all__ = ["FORMULA", "stage2_step_flops", "text_flops_per_sample"]
