"""Retrieval, CRA and zero-shot evaluation of a saved model on a held-out caption source.

Every image of the source is embedded by the model's vision tower; every caption is embedded end to
end the way the model reads text: through the frozen LLM (``LLMTextEncoder``, the one recorded in the
model's config unless ``llm`` names another) and the trained adapter, or through the model's own CLIP
text tower for the baseline. Reported (fractions in [0, 1]):

- image->text and text->image recall@1/5/10 over the whole source, one caption per image; ties count
  by their expectation under a random tie-break (see :mod:`llm2clip_fast.eval.retrieval_metrics`);
- CRA, caption retrieval accuracy: each short caption retrieves its own long caption (top-1) among
  all long captions of the source, through the same text path (only when both captions exist);
- zero-shot accuracy where records carry a label: the class prompt "a photo of a {label}." of every
  distinct label is embedded and each image is classified by the nearest prompt.

``python -m llm2clip_fast.train eval --data`` runs :func:`evaluate_model_dir` and prints
:func:`format_results_table`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..redaction import redact
from .retrieval_metrics import (
    caption_retrieval_accuracy,
    image_text_retrieval,
    zero_shot_accuracy,
)
from .text_encoder import load_text_encoder

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
ZERO_SHOT_TEMPLATE = "a photo of a {label}."


def _log(message: str) -> None:
    logger.info("[eval] %s", message)


def collect_eval_set(source: Any, preprocessing: Any) -> dict[str, Any]:
    """Decode and preprocess every good record of ``source`` with the tower's evaluation transform
    (``preprocessing``: the model's :class:`~llm2clip_fast.models.image_preprocessing.ImagePreprocessing`,
    or an image size for CLIP's).

    Returns ``{"keys": [...], "pixel_values": (N, 3, S, S) fp32, "captions": {name: [...]},
    "labels": [str | None, ...], "bad": tracker summary dict}``. Bad samples are skipped and
    counted by the source's bad-data tracker (which stops past its threshold).
    """
    from llm2clip_fast.data.image_transforms import clip_image_transform, image_transform_for

    if isinstance(preprocessing, int):
        transform = clip_image_transform(preprocessing, train=False)
    else:
        transform = image_transform_for(preprocessing, train=False)
    keys, pixels, labels = [], [], []
    captions: dict[str, list[str]] = {name: [] for name in source.caption_names}
    for record in source.iter_records():
        keys.append(record.key)
        pixels.append(transform(record.image))
        labels.append(record.label)
        for name in captions:
            captions[name].append(record.captions[name])
    if not keys:
        raise ValueError(f"no usable records in {source.describe()}: {source.bad_data.summary()}")
    return {"keys": keys, "pixel_values": torch.stack(pixels), "captions": captions, "labels": labels,
            "bad": source.bad_data.as_dict()}


@torch.no_grad()
def embed_images(model: Any, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, 3, S, S) -> (N, embed_dim) L2-normalised fp32 image features, in batches."""
    device = next(model.parameters()).device
    out = [model.encode_image(pixel_values[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in range(0, pixel_values.shape[0], batch_size)]
    return torch.cat(out)


def evaluate(model: Any, eval_set: dict[str, Any], *, encoder: Any = None, caption: str = "long",
             cra_captions: tuple[str, str] | None = ("short", "long"), batch_size: int = 64,
             ks: Sequence[int] = DEFAULT_KS) -> dict[str, Any]:
    """All metrics of ``model`` on a collected eval set (see :func:`collect_eval_set`).

    ``caption`` names the caption retrieval uses; ``cra_captions`` the (query, target) caption names
    for CRA (skipped when either is missing, or None). ``encoder`` is the LLM for llm-adapter models.
    Returns a flat dict: ``n``, ``caption``, ``i2t_R@K``/``t2i_R@K``, ``cra`` (or None),
    ``zero_shot`` (or None), ``n_classes``, ``seconds``.
    """
    names = eval_set["captions"]
    if caption not in names:
        raise ValueError(f"caption {caption!r} is not in the data; captions found: {sorted(names)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    start = time.perf_counter()
    model.eval()
    n = len(eval_set["keys"])

    def embed_texts(texts: list[str]) -> torch.Tensor:
        return model.encode_captions(texts, encoder, batch_size=batch_size, normalize=True).float().cpu()

    images = embed_images(model, eval_set["pixel_values"], batch_size)
    texts = {caption: embed_texts(names[caption])}
    results: dict[str, Any] = {"n": n, "caption": caption, "chance_R@1": 1.0 / n}
    results.update(image_text_retrieval(images, texts[caption], ks))

    results["cra"] = None
    if cra_captions is not None and all(c in names for c in cra_captions):
        for name in cra_captions:
            if name not in texts:
                texts[name] = embed_texts(names[name])
        results["cra"] = caption_retrieval_accuracy(texts[cra_captions[0]], texts[cra_captions[1]])

    results["zero_shot"], results["n_classes"] = None, 0
    labelled = [i for i, label in enumerate(eval_set["labels"]) if label is not None]
    if labelled:
        classes = sorted({eval_set["labels"][i] for i in labelled})
        class_emb = model.class_prompt_embeddings(classes, encoder, templates=(ZERO_SHOT_TEMPLATE,),
                                                  batch_size=batch_size).float().cpu()
        index = {c: j for j, c in enumerate(classes)}
        targets = torch.tensor([index[eval_set["labels"][i]] for i in labelled])
        results["zero_shot"] = zero_shot_accuracy(images[labelled], class_emb, targets)
        results["n_classes"] = len(classes)
        results["n_labelled"] = len(labelled)
    results["seconds"] = time.perf_counter() - start
    return results


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:5.1f}"


def format_results_table(rows: dict[str, dict[str, Any]], ks: Sequence[int] = DEFAULT_KS) -> str:
    """A text table, one row per named result dict (as :func:`evaluate` returns), percentages."""
    cols = [f"i2t R@{k}" for k in ks] + [f"t2i R@{k}" for k in ks] + ["CRA", "zero-shot", "n"]
    keys = [f"i2t_R@{k}" for k in ks] + [f"t2i_R@{k}" for k in ks] + ["cra", "zero_shot"]
    name_w = max(12, *(len(name) for name in rows))
    widths = [max(7, len(c)) for c in cols]
    lines = ["  ".join([" " * name_w, *(c.rjust(w) for c, w in zip(cols, widths))])]
    for name, r in rows.items():
        cells = [_pct(r.get(k)) for k in keys] + [str(r.get("n", "-"))]
        lines.append("  ".join([name.ljust(name_w), *(c.rjust(w) for c, w in zip(cells, widths))]))
    return "\n".join(lines)


def evaluate_model_dir(model_dir: str | os.PathLike[str], data: str, *, llm: str | None = None,
                       caption: str = "long", batch_size: int = 64, encoder: Any = None,
                       ks: Sequence[int] = DEFAULT_KS, image_root_only: bool = False,
                       template: str | None = None, device: str | torch.device | None = None,
                       quantize: str | None = None, allow_llm_change: bool = False,
                       encoding_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a saved model and a caption source and evaluate (the ``eval`` sub-command's work).

    ``encoder`` reuses an already loaded LLM (the pipeline evaluates two splits with one load).
    ``image_root_only``: manifest image paths outside the manifest's folder are bad samples.
    ``device``: where the model and the LLM run (None: the model on the CPU, the LLM where its loader
    puts it). ``quantize``: the LLM's 8-bit mode instead of the one its cache recorded.
    ``allow_llm_change``: evaluate even when the LLM's files differ from those the model recorded (see
    :func:`load_text_encoder`). ``encoding_overrides``: encoding settings (``max_length``,
    ``doc_max_length``) that replace those the model recorded (``--max-length``, ``--doc-max-length``,
    ``--recipe llm2clip``).
    """
    from llm2clip_fast.data.sources import open_source
    from llm2clip_fast.models.llm2clip import LLM2CLIPModel

    model = LLM2CLIPModel.from_pretrained(model_dir, device=device if device is not None else "cpu")
    if encoding_overrides:
        model.config.llm = {**(model.config.llm or {}), **encoding_overrides}
    source = open_source(data, image_root_only=image_root_only)
    from llm2clip_fast.data.caption_names import resolve_caption_name

    caption = resolve_caption_name(caption, source.caption_names)  # 'long' finds the official longSV_captions
    if caption not in source.caption_names:
        raise ValueError(f"--caption {caption!r} is not a caption of {data}; captions found: "
                         f"{source.caption_names}")
    if encoder is None:
        encoder = load_text_encoder(model, llm, template=template, device=device, quantize=quantize,
                                    allow_llm_change=allow_llm_change)
    recorded = model.config.llm or {}
    text_path = (f"LLM {llm or recorded.get('model') or recorded.get('path')}" if encoder is not None
                 else "clip text tower")
    _log(f"{source.describe()}: embedding images and {caption!r} captions ({text_path})")
    eval_set = collect_eval_set(source, model.preprocessing)
    results = evaluate(model, eval_set, encoder=encoder, caption=caption, batch_size=batch_size, ks=ks)
    results.update({"model": str(model_dir), "data": redact(str(data)), "text_tower": model.config.text_tower,
                    "bad_samples": eval_set["bad"]})
    return results
