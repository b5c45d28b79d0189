"""LLM2CLIPModel: a vision tower and a text side trained contrastively into one embedding space.

Image side: a vision tower (:class:`~llm2clip_fast.models.vision.VisionTower`: transformers CLIP/SigLIP/ViT
or timm), its pooled feature projected by ``visual_projection`` (Linear(hidden -> embed_dim), no bias as
CLIP, or with a bias as EVA-CLIP's ``visual.head`` when ``config.projection_bias``).

Text side, by ``config.text_tower``:

- ``"llm-adapter"`` (LLM2CLIP): the frozen LLM's caption embedding (B, llm_dim), computed offline and
  read from the embedding cache, goes through the trained :class:`TextAdapter` to (B, embed_dim);
- ``"clip"`` (the baseline): a CLIP-style text transformer trained from scratch on token ids with a
  77-token context (:class:`~llm2clip_fast.models.clip_text_tower.ClipTextTower`).

A learnable log logit scale (init ln(1/0.07) for the CLIP loss, ln(10) for SigLIP, always clamped to
ln(100) when used) and, for SigLIP, a learnable logit bias (init -10).

Saved as a folder: ``model.safetensors`` (every weight, no pickles) and ``config.json`` (vision
architecture, dims, adapter or text-tower config, loss, and the LLM that produced the cached embeddings
so evaluation can embed new captions the same way). Both files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_files import write_path_atomic
from .image_preprocessing import ImagePreprocessing
from .vision import VisionTower

LOSS_KINDS = ("clip", "siglip")
TEXT_TOWERS = ("llm-adapter", "clip")
MAX_LOG_LOGIT_SCALE = math.log(100.0)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_FORMAT = "llm2clip_fast.LLM2CLIPModel"
DEFAULT_PROMPT_TEMPLATES = ("a photo of a {label}.",)


@dataclass
class LLM2CLIPConfig:
    """Everything needed to rebuild an :class:`LLM2CLIPModel` (weights aside).

    vision: ``{"kind": "clip"|"siglip"|"vit", "config": {transformers config fields}}`` or ``{"kind":
    "timm", "config": {"model_name", "model_args"}}``, plus ``"preprocessing"``.
    embed_dim: shared embedding size. projection_bias: whether ``visual_projection`` has a bias
    (converted EVA-CLIP models: their ``visual.head`` has one). text_tower: "llm-adapter" or "clip".
    llm_dim: LLM embedding size (llm-adapter only). adapter: TextAdapter keyword arguments
    (num_blocks, expansion, dropout, input_norm; input_norm "none" only for converted checkpoints
    whose official forward skips the L2 step, see ``llm2clip_fast.convert``).
    clip_text: ClipTextTowerConfig fields ("clip" tower only; its embed_dim must equal embed_dim).
    loss: "clip" or "siglip" (sets the logit-scale init and whether a logit bias exists).
    llm: provenance of the cached embeddings (``path`` and the encoder options), for evaluation.
    """

    vision: dict[str, Any]
    embed_dim: int = 512
    text_tower: str = "llm-adapter"
    llm_dim: int | None = None
    adapter: dict[str, Any] = field(default_factory=lambda: {"num_blocks": 4, "expansion": 2, "dropout": 0.0})
    clip_text: dict[str, Any] | None = None
    loss: str = "clip"
    llm: dict[str, Any] = field(default_factory=dict)
    projection_bias: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.vision, dict) or "kind" not in self.vision or "config" not in self.vision:
            raise ValueError("LLM2CLIPConfig.vision must be a dict with 'kind' and 'config' "
                             f"(VisionTower.config_dict()), got {self.vision!r:.200}")
        if isinstance(self.embed_dim, bool) or not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if self.text_tower not in TEXT_TOWERS:
            raise ValueError(f"text_tower must be one of {TEXT_TOWERS}, got {self.text_tower!r}")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if not isinstance(self.projection_bias, bool):
            raise ValueError(f"projection_bias must be true or false, got {self.projection_bias!r}")
        if self.text_tower == "llm-adapter":
            if isinstance(self.llm_dim, bool) or not isinstance(self.llm_dim, int) or self.llm_dim < 1:
                raise ValueError(f"llm_dim must be a positive int for the llm-adapter text tower, "
                                 f"got {self.llm_dim!r}")
            unknown = sorted(set(self.adapter) - {"num_blocks", "expansion", "dropout", "input_norm"})
            if unknown:
                raise ValueError(f"unknown adapter options {unknown}; "
                                 "expected num_blocks, expansion, dropout, input_norm")
        else:
            clip_text = dict(self.clip_text or {})
            if clip_text.get("embed_dim", self.embed_dim) != self.embed_dim:
                raise ValueError(f"clip_text.embed_dim ({clip_text['embed_dim']}) must equal "
                                 f"embed_dim ({self.embed_dim})")
            clip_text["embed_dim"] = self.embed_dim
            self.clip_text = clip_text

    def to_dict(self) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LLM2CLIPConfig:
        data = dict(data)
        fmt = data.pop("format", MODEL_FORMAT)
        if fmt != MODEL_FORMAT:
            raise ValueError(f"config format is {fmt!r}, expected {MODEL_FORMAT!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LLM2CLIP config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


class LLM2CLIPModel(nn.Module):
    """Vision tower + projection, text adapter (or CLIP text tower), learnable logit scale (and bias).

    Args:
        config: the architecture (see :class:`LLM2CLIPConfig`).
        vision_tower: an already built tower (e.g. loaded with pretrained weights); its architecture
            replaces ``config.vision``. Without it, a randomly initialised tower is built from the config.
    """

    def __init__(self, config: LLM2CLIPConfig, vision_tower: VisionTower | None = None) -> None:
        super().__init__()
        if not isinstance(config, LLM2CLIPConfig):
            raise TypeError(f"config must be an LLM2CLIPConfig, got {type(config).__name__}")
        if vision_tower is None:
            saved = config.vision.get("preprocessing")
            # A config saved before towers carried their preprocessing was trained with CLIP's, whatever
            # the tower: keep it so that its numbers do not move.
            vision_tower = VisionTower.from_config(config.vision["kind"], config.vision["config"])
            vision_tower.preprocessing = (ImagePreprocessing.from_dict(saved) if saved is not None
                                          else ImagePreprocessing(vision_tower.image_size))
        elif not isinstance(vision_tower, VisionTower):
            raise TypeError(f"vision_tower must be a VisionTower, got {type(vision_tower).__name__}")
        config.vision = vision_tower.config_dict()
        self.config = config
        self.vision = vision_tower
        self.visual_projection = nn.Linear(vision_tower.hidden_size, config.embed_dim,
                                           bias=config.projection_bias)
        nn.init.normal_(self.visual_projection.weight, std=vision_tower.hidden_size ** -0.5)
        if self.visual_projection.bias is not None:
            nn.init.zeros_(self.visual_projection.bias)
        if config.text_tower == "llm-adapter":
            from .text_adapter import TextAdapter

            self.text_adapter = TextAdapter(config.llm_dim, config.embed_dim, **config.adapter)
        else:
            from .clip_text_tower import ClipTextTower, ClipTextTowerConfig

            self.clip_text = ClipTextTower(ClipTextTowerConfig.from_dict(config.clip_text))
        if config.loss == "clip":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.logit_bias = None
        else:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))

    # -- properties ---------------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def preprocessing(self) -> ImagePreprocessing:
        """How images are prepared for this model's tower (saved in config.json's ``vision``)."""
        return self.vision.preprocessing

    @property
    def text_tower(self) -> str:
        return self.config.text_tower

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- encoders -----------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """pixel_values (B, 3, S, S) float, S = ``image_size`` -> image features (B, embed_dim)."""
        features = self.visual_projection(self.vision(pixel_values))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text_inputs: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = False) -> torch.Tensor:
        """Text features (B, embed_dim).

        llm-adapter tower: ``text_inputs`` are LLM caption embeddings (B, llm_dim) float.
        clip tower: ``text_inputs`` are token ids (B, L) int with ``attention_mask`` (B, L) (see
        :meth:`tokenize`).
        """
        if not isinstance(text_inputs, torch.Tensor):
            raise TypeError(f"text_inputs must be a torch.Tensor, got {type(text_inputs).__name__}")
        if self.config.text_tower == "llm-adapter":
            if not text_inputs.is_floating_point():
                raise TypeError("the llm-adapter text tower takes LLM embeddings (B, llm_dim) float, "
                                f"got dtype {text_inputs.dtype} (token ids belong to the 'clip' text tower)")
            if text_inputs.dim() != 2 or text_inputs.shape[1] != self.config.llm_dim:
                raise ValueError(f"LLM embeddings must be (B, {self.config.llm_dim}), got "
                                 f"{tuple(text_inputs.shape)}: the adapter was built for llm_dim="
                                 f"{self.config.llm_dim}")
            features = self.text_adapter(text_inputs)
        else:
            if text_inputs.is_floating_point():
                raise TypeError("the clip text tower takes token ids (B, L) int; got a float tensor "
                                "(LLM embeddings belong to the 'llm-adapter' text tower)")
            if attention_mask is None:
                raise ValueError("the clip text tower needs attention_mask with the token ids (see tokenize)")
            features = self.clip_text(text_inputs, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask (B, L) int64 for the clip text tower."""
        if self.config.text_tower != "clip":
            raise ValueError("tokenize() belongs to the 'clip' text tower; this model's text tower is "
                             f"{self.config.text_tower!r} (it reads LLM embeddings)")
        return self.clip_text.tokenize(list(texts))

    @torch.no_grad()
    def encode_captions(self, texts: Sequence[str], encoder: Any = None, batch_size: int = 256,
                        normalize: bool = True) -> torch.Tensor:
        """Embed raw captions end to end, without grad: (N, embed_dim) fp32.

        llm-adapter tower: ``encoder`` (an ``LLMTextEncoder``, the same LLM the training cache came
        from) runs first, then the adapter. clip tower: the captions are tokenised and encoded; no
        encoder is needed. Call ``model.eval()`` first for deterministic output (adapter dropout).
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        device = self.visual_projection.weight.device
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim, device=device)
        if self.config.text_tower == "llm-adapter":
            if encoder is None or not hasattr(encoder, "encode"):
                raise TypeError("encode_captions needs encoder=<LLMTextEncoder> for the llm-adapter text "
                                f"tower (the LLM recorded in the config: {self.config.llm.get('path')!r})")
            llm_embeddings = encoder.encode(texts, batch_size=batch_size, show_progress=False)
            llm_embeddings = torch.as_tensor(llm_embeddings)
            if llm_embeddings.dim() != 2 or llm_embeddings.shape[1] != self.config.llm_dim:
                raise ValueError(f"the encoder gives embeddings of shape {tuple(llm_embeddings.shape)} "
                                 f"but the adapter expects llm_dim={self.config.llm_dim}: use the LLM "
                                 f"the cache came from ({self.config.llm.get('path')!r})")
            chunks = [self.encode_text(llm_embeddings[i:i + batch_size].to(device), normalize=normalize)
                      for i in range(0, len(texts), batch_size)]
        else:
            chunks = []
            for i in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[i:i + batch_size])
                chunks.append(self.encode_text(ids.to(device), mask.to(device), normalize=normalize))
        return torch.cat(chunks).float()

    # -- logits -------------------------------------------------------------------------------------

    def logit_scale_value(self) -> torch.Tensor:
        """The multiplier the losses take: exp(logit_scale) with logit_scale clamped to ln(100)."""
        return self.logit_scale.clamp(max=MAX_LOG_LOGIT_SCALE).exp()

    def forward(self, pixel_values: torch.Tensor, text_inputs: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """L2-normalised features and logit parameters, ready for ``clip_loss`` / ``siglip_loss``.

        Returns ``{"image_features": (B, E), "text_features": (B, E), "logit_scale": scalar
        (exponentiated, clamped)}`` plus ``"logit_bias"`` for SigLIP models.
        """
        out = {
            "image_features": self.encode_image(pixel_values, normalize=True),
            "text_features": self.encode_text(text_inputs, attention_mask, normalize=True),
            "logit_scale": self.logit_scale_value(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    # -- zero-shot ----------------------------------------------------------------------------------

    @torch.no_grad()
    def class_prompt_embeddings(self, labels: Sequence[str], encoder: Any = None,
                                templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES,
                                batch_size: int = 256) -> torch.Tensor:
        """One normalised text embedding per class (C, embed_dim): the mean over ``templates``
        (each containing ``{label}``) of the normalised caption embeddings, renormalised."""
        if not labels:
            raise ValueError("labels is empty")
        if not templates or any("{label}" not in t for t in templates):
            raise ValueError(f"templates must be non-empty and each contain '{{label}}', got {templates!r}")
        prompts = [t.format(label=label) for label in labels for t in templates]
        emb = self.encode_captions(prompts, encoder, batch_size=batch_size, normalize=True)
        emb = emb.view(len(labels), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def zero_shot_classify(self, pixel_values: torch.Tensor,
                           class_text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify images against class text embeddings.

        pixel_values: (B, 3, S, S). class_text_embeddings: (C, embed_dim) text-side features (e.g.
        from :meth:`class_prompt_embeddings`; normalised here anyway). Returns ``(probs, preds)``:
        probs (B, C) fp32, a softmax over classes for CLIP models, per-class sigmoids for SigLIP;
        preds (B,) int64 argmax.
        """
        if class_text_embeddings.dim() != 2 or class_text_embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"class_text_embeddings must be (C, {self.embed_dim}), got "
                             f"{tuple(class_text_embeddings.shape)}")
        image = self.encode_image(pixel_values, normalize=True).float()
        classes = F.normalize(class_text_embeddings.to(image.device).float(), dim=-1)
        logits = self.logit_scale_value().float() * image @ classes.T
        if self.logit_bias is not None:
            probs = torch.sigmoid(logits + self.logit_bias.float())
        else:
            probs = logits.softmax(dim=-1)
        return probs, logits.argmax(dim=-1)

    # -- save / load --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike[str],
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed),
        each atomically; the config goes last. ``state_dict`` overrides the weights written (e.g. a
        full state dict gathered from FSDP shards)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        write_path_atomic(directory / WEIGHTS_NAME,
                      lambda p: save_file(tensors, p, metadata={"format": "pt", "model": MODEL_FORMAT}))
        text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        write_path_atomic(directory / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str],
                        device: str | torch.device = "cpu") -> LLM2CLIPModel:
        """Load a model saved by :meth:`save_pretrained` (weights bit-identical): a local folder, or a
        hub name (``owner/name``) already in the local Hugging Face cache (never downloaded). The global
        RNG is left untouched. A damaged or truncated ``model.safetensors`` raises
        :class:`~llm2clip_fast.safetensors_files.DamagedWeightsError` naming it."""
        from ..safetensors_files import read_safetensors
        from .llm_encoder import resolve_model_path

        try:
            directory = resolve_model_path(directory)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{str(directory)!r} is not a saved LLM2CLIPModel: {exc}") from None
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        missing = [p.name for p in (config_file, weights_file) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory} is not a saved LLM2CLIPModel: missing {missing}")
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        if "format" not in raw and ("vision_config" in raw or "auto_map" in raw):
            raise ValueError(f"{directory} is a Hugging Face model folder (an LLM2CLIP release or a CLIP "
                             "model), not a saved LLM2CLIPModel; convert it first with python -m "
                             "llm2clip_fast.convert --from llm2clip-hf (or hf-clip)")
        config = LLM2CLIPConfig.from_dict(raw)
        # Random initialisation of the skeleton must not shift the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            model = cls(config)
        state = read_safetensors(weights_file, device=str(device))
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{weights_file} does not match the config: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        return model.to(device)
