"""Embedding a suite's images and texts, batched, with a progress bar, cached per model and data.

An embedder (:class:`SuiteEmbedder`) turns images and texts into vectors; :class:`ModelEmbedder` is a
saved ``LLM2CLIPModel`` with its own text path (frozen LLM + adapter with the encoding settings its
cache recorded, or the model's CLIP text tower). Texts go in length-sorted batches so a batch pads to
similar lengths. Embeddings are cached in ``cache_dir`` under a key made of the embedder's identity
(its files' paths, sizes and modification times, and the text-encoding settings) and the suite's data
(image files' paths, sizes and times; the texts themselves), so a second run reads them back instead
of running the model, and any change to either re-embeds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ...atomic_files import write_stream_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


class SuiteEmbedder(Protocol):
    """What the suites need from a model. Embeddings may be unnormalised; metrics normalise."""

    def identity(self, side: str) -> dict[str, Any]:
        """JSON-able description of what makes the ``side`` ("image" or "text") embeddings."""

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> tensor; must be picklable when DataLoader workers are used."""

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, ...) stacked transformed images -> (B, D) float."""

    def text_order(self, texts: list[str]) -> list[int]:
        """Indices of ``texts``, longest first (the batching order)."""

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """One batch of texts -> (B, D) float."""


def _file_stats(paths: Sequence[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def folder_stats(folder: str | os.PathLike[str]) -> list[list[Any]]:
    """Path, size and modification time of every weight, config and tokenizer file under ``folder``."""
    from llm2clip_fast.data.embedding_cache import _ENCODER_FILE_SUFFIXES

    root = Path(folder)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in _ENCODER_FILE_SUFFIXES)
    return _file_stats(files)


class ModelEmbedder:
    """A saved ``LLM2CLIPModel`` as a :class:`SuiteEmbedder`.

    The frozen LLM (llm-adapter models) is loaded only when texts must actually be embedded, so a run
    served from the cache never loads it. ``llm``/``template``/``quantize`` override what the model's
    config recorded, as in ``train eval --data``; ``encoder`` reuses an already loaded ``LLMTextEncoder``;
    ``allow_llm_change`` lets an LLM whose files differ from those the model recorded embed texts.
    """

    def __init__(self, model_dir: str | os.PathLike[str], *, llm: str | None = None,
                 template: str | None = None, device: str | torch.device = "cpu",
                 encoder: Any = None, quantize: str | None = None, allow_llm_change: bool = False,
                 encoding_overrides: dict[str, Any] | None = None) -> None:
        from llm2clip_fast.distributed import resolve_device
        from llm2clip_fast.models.llm2clip import CONFIG_NAME, WEIGHTS_NAME, LLM2CLIPModel

        # A name (auto, cpu, cuda, cuda:N) means what --device means in every sub-command.
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.model_dir = Path(model_dir)
        self.model = LLM2CLIPModel.from_pretrained(self.model_dir, device=self.device).eval()
        if encoding_overrides:  # --max-length / --doc-max-length / --recipe llm2clip replace the recorded
            self.model.config.llm = {**(self.model.config.llm or {}), **encoding_overrides}
        self._model_files = _file_stats([self.model_dir / CONFIG_NAME, self.model_dir / WEIGHTS_NAME])
        self._llm, self._template, self._encoder, self._quantize = llm, template, encoder, quantize
        self._allow_llm_change = allow_llm_change

    @property
    def text_path(self) -> str:
        if self.model.config.text_tower != "llm-adapter":
            return "clip text tower"
        recorded = self.model.config.llm or {}
        return f"LLM {self._llm or recorded.get('path') or recorded.get('model')} + adapter"

    @property
    def encoder(self) -> Any:
        if self._encoder is None and self.model.config.text_tower == "llm-adapter":
            from llm2clip_fast.eval.text_encoder import load_text_encoder

            self._encoder = load_text_encoder(self.model, self._llm, template=self._template,
                                              device=self.device, quantize=self._quantize,
                                              allow_llm_change=self._allow_llm_change)
        return self._encoder

    def identity(self, side: str) -> dict[str, Any]:
        ident: dict[str, Any] = {"model": self._model_files, "side": side}
        if side == "image":
            ident["image_size"] = self.model.image_size
            ident["preprocessing"] = self.model.preprocessing.to_dict()
        elif side == "text" and self.model.config.text_tower == "llm-adapter":
            from llm2clip_fast.models.llm_encoder import resolve_model_path

            recorded = {k: v for k, v in (self.model.config.llm or {}).items() if k != "source"}
            path = self._llm or recorded.get("path") or recorded.get("model")
            lora = recorded.get("lora")
            adapters = [a.strip() for a in lora.split(",") if a.strip()] if isinstance(lora, str) else []
            ident["llm"] = {
                "settings": recorded, "override_path": self._llm, "override_template": self._template,
                **({"override_quantize": self._quantize} if self._quantize is not None else {}),
                "files": folder_stats(resolve_model_path(path)) if path else None,
                "lora_files": [folder_stats(a) for a in adapters if Path(a).exists()],
            }
        return ident

    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        from llm2clip_fast.data.image_transforms import image_transform_for

        return image_transform_for(self.model.preprocessing, train=False)

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device), normalize=True).float().cpu()

    def text_order(self, texts: list[str]) -> list[int]:
        encoder = self.encoder
        if encoder is not None and hasattr(encoder, "length_order"):
            return list(encoder.length_order(texts))
        return sorted(range(len(texts)), key=lambda i: -len(texts[i]))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        emb = self.model.encode_captions(texts, self.encoder, batch_size=len(texts), normalize=True)
        return emb.float().cpu()


# ------------------------------------------------------------------------------------ images
class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one listed image; a missing or undecodable file becomes a reason, not an exception."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        from PIL import Image

        path = self.paths[i]
        if not path.is_file():
            return i, None, "missing"
        try:
            with Image.open(path) as image:
                return i, self.transform(image.convert("RGB")), None
        except Exception as exc:  # any decoder failure is a bad sample, reported with its reason
            return i, None, f"undecodable: {type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]
             ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, bad


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
                          .encode()).hexdigest()


def _load_cache(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged cache file is recomputed, not fatal
        logger.warning("[eval] ignoring the unreadable cache file %s: %s", path, type(exc).__name__)
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def _save_cache(path: Path, data: dict[str, Any]) -> None:
    write_stream_atomic(path, lambda f: torch.save(data, f))


def embed_images(embedder: SuiteEmbedder, images: Sequence[Path], ids: Sequence[str], *, batch_size: int = 64,
                 workers: int = 0, cache_dir: str | os.PathLike[str] | None = None, tag: str = "images",
                 progress: bool = True) -> tuple[torch.Tensor | None, list[int], dict[str, str], bool]:
    """Embed every listed image that decodes.

    Returns ``(embeddings (K, D) fp32 or None when none decoded, kept indices into images (K,),
    {image id: reason} for the others, from_cache)``.
    """
    from .suite_data import images_fingerprint

    key = _cache_key({"embedder": embedder.identity("image"), "images": images_fingerprint(list(images))})
    path = Path(cache_dir) / f"{tag}-images-{key[:24]}.pt" if cache_dir is not None else None
    if path is not None and (hit := _load_cache(path, key)) is not None:
        return hit["embeddings"], hit["kept"].tolist(), dict(hit["bad"]), True
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_ImageFiles(images, embedder.image_transform()),
                                         batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         shuffle=False)
    kept, chunks, bad = [], [], {}
    for idx, pixels, failed in tqdm(loader, desc=f"{tag} images", unit="batch", disable=not progress,
                                    file=sys.stderr):
        for i, reason in failed:
            bad[ids[i]] = reason
        if pixels is not None:
            chunks.append(embedder.embed_pixels(pixels).float().cpu())
            kept.extend(idx)
    embeddings = torch.cat(chunks) if chunks else None
    if path is not None:
        _save_cache(path, {"key": key, "embeddings": embeddings, "kept": torch.tensor(kept, dtype=torch.long),
                           "bad": bad})
    return embeddings, kept, bad, False


def embed_texts(embedder: SuiteEmbedder, texts: Sequence[str], *, batch_size: int = 64,
                cache_dir: str | os.PathLike[str] | None = None, tag: str = "texts",
                progress: bool = True) -> tuple[torch.Tensor, bool]:
    """Embed ``texts`` longest first in batches of ``batch_size``; rows come back in input order.

    Returns ``((N, D) fp32, from_cache)``.
    """
    texts = list(texts)
    text_hash = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    key = _cache_key({"embedder": embedder.identity("text"), "texts": text_hash})
    path = Path(cache_dir) / f"{tag}-texts-{key[:24]}.pt" if cache_dir is not None else None
    if path is not None and (hit := _load_cache(path, key)) is not None:
        return hit["embeddings"], True
    from tqdm.auto import tqdm

    order = embedder.text_order(texts)
    if sorted(order) != list(range(len(texts))):
        raise ValueError("text_order must return a permutation of the text indices")
    out: torch.Tensor | None = None
    for start in tqdm(range(0, len(texts), batch_size), desc=f"{tag} texts", unit="batch",
                      disable=not progress, file=sys.stderr):
        idx = order[start:start + batch_size]
        emb = embedder.embed_texts([texts[i] for i in idx]).float().cpu()
        if out is None:
            out = torch.empty(len(texts), emb.shape[1], dtype=torch.float32)
        out[torch.as_tensor(idx)] = emb
    if out is None:
        raise ValueError("no texts to embed")
    if path is not None:
        _save_cache(path, {"key": key, "embeddings": out})
    return out, False
