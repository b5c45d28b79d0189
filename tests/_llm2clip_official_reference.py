# ruff: noqa: E501  (signature kept as the official code writes it)
"""A transcription of the official LLM2CLIP text adapter, the converted ``encode_text`` is tested against.

Source: github microsoft/LLM2CLIP at commit cba3b45ba3d9bdaaf8ad640156dedbdbcb60353a:

- ``llm2clip/eva_clip/transformer.py``: ``LayerNorm`` (torch LayerNorm cast back to the input dtype);
- ``llm2clip/eva_clip/model.py``: ``LinearBlock`` and ``TextProj`` (``__init__`` and ``forward``).

The bodies are copied statement for statement; ``lock`` and ``set_grad_checkpointing`` are left out.
Note that ``LinearBlock``'s ``norm_layer`` defaults to the eva_clip ``LayerNorm`` and ``TextProj`` does
not pass its own ``norm_layer`` on, while the head LayerNorm is a plain ``nn.LayerNorm``: both eps 1e-5.

How the checkpoints name it: the EVA-CLIP state dicts hold ``TextProj`` as ``text`` (``CustomCLIP.text``,
keys ``text.text_adaptor.*``) and call it with the default ``l2_norm=True``; the Hugging Face releases
hold the same ``nn.Sequential`` as ``text_adapter.adaptor.*`` and their ``get_text_features`` applies it
to the LLM2Vec embedding as given, i.e. ``TextProj.forward(x, l2_norm=False)`` (as
``LLM2VecTextTransformer`` does). That last point comes from the releases' documented use and code that
indexes ``text_adapter.adaptor[5]``; the releases' ``modeling_llm2clip.py`` was not readable offline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """Subclass torch's LayerNorm (with cast back to input dtype)."""

    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class LinearBlock(nn.Module):
    def __init__(self, dim, expansion_factor=4, dropout=0., norm_layer=LayerNorm):
        super().__init__()
        self.fn = nn.Sequential(
            nn.Linear(dim, int(expansion_factor * dim)),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(int(expansion_factor * dim), dim),
        )
        self.ln = norm_layer(dim)

    def forward(self, x):
        return x + self.fn(self.ln(x))


class TextProj(nn.Module):
    def __init__(self, embedding_dim=4096, output_dim=512, expansion_factor=2, num_layers_text=4, proj_bias=True, dropout=0, norm_layer=LayerNorm):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.text_adaptor = nn.Sequential(
            *[LinearBlock(embedding_dim, expansion_factor, dropout) for _ in range(num_layers_text)],
            nn.LayerNorm(embedding_dim),
            nn.Linear(embedding_dim, output_dim, bias=proj_bias),
        )

    def forward(self, text, return_all_features: bool = False, l2_norm: bool = True):
        if l2_norm:
            text = torch.nn.functional.normalize(text, p=2, dim=-1)
        x = self.text_adaptor(text)
        return x
