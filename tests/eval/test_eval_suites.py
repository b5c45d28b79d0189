"""Benchmark suites (``train eval --suite``) on miniature copies in each dataset's real layout.

Expected recalls are counted by hand. A fake embedder makes that possible: an image's embedding is its
solid colour (each channel 0/120/240 read back as 0/1/2), a text's embedding the sum of the ``[a b c]``
vectors written in it, so every cosine similarity below is known. Ties count by their expectation under
a random tie-break (``retrieval_metrics``). End-to-end tests run the command on tiny saved and converted
models (an HF-format release; an EVA-CLIP state dict, also after stage 2 continued from it).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from _tiny_llm2clip import tiny_clip_tower_model

from llm2clip_fast.data.bad_data import BadDataError
from llm2clip_fast.eval.retrieval_metrics import (
    multi_caption_retrieval,
    multi_positive_hit_rates,
    topk_hit_rates,
)
from llm2clip_fast.eval.suites import (
    SUITES,
    SuiteLayoutError,
    evaluate_suite,
    find_suites,
    read_suite,
    run_suites,
)
from llm2clip_fast.eval.suites.class_folders import imagenet_class_names, openai_imagenet_templates

# -- the fake embedder ----------------------------------------------------------------------------


def colour_vector(image) -> torch.Tensor:
    """Module level so DataLoader workers could pickle it: mean colour / 120, rounded (JPEG-proof)."""
    import numpy as np

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).reshape(-1, 3))
    return (pixels.mean(dim=0) / 120).round()


class FakeEmbedder:
    def __init__(self) -> None:
        self.images_embedded = 0
        self.texts_embedded = 0

    def identity(self, side: str) -> dict:
        return {"fake": 1, "side": side}

    def image_transform(self):
        return colour_vector

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images_embedded += pixels.shape[0]
        return pixels.float()

    def text_order(self, texts: list[str]) -> list[int]:
        return sorted(range(len(texts)), key=lambda i: -len(texts[i]))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self.texts_embedded += len(texts)
        out = []
        for text in texts:
            vecs = [torch.tensor([float(x) for x in m.split()]) for m in re.findall(r"\[([-\d. ]+)\]", text)]
            out.append(torch.stack(vecs).sum(dim=0))
        return torch.stack(out)


def write_image(path: Path, vector: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.new("RGB", (20, 16), tuple(120 * v for v in vector)).save(path, format=fmt, quality=95)


# Three images A, B, C (and D, listed but absent). Multi-caption sets (Flickr30k, COCO):
#   A: [0 1 1], [1 0 0]   B: [1 0 0], [1 1 0]   C: [0 0 1], [0 1 1]      D: [1 1 1] (dropped with D)
# image->text, R@1: A's best caption [1 0 0] (cos 1) ties with B's [1 0 0] -> 1/2; B's best, [1 1 0]
# (0.707), ties with A's and C's [0 1 1] -> 1/3; C's [0 0 1] (cos 1) is alone -> 1. Mean 11/18.
# text->image, R@1: A[0 1 1] beaten by B and C -> 0; A[1 0 0] -> 1; B[1 0 0] beaten by A -> 0;
# B[1 1 0] ties A and B -> 1/2; C[0 0 1] -> 1; C[0 1 1] ties B and C -> 1/2. Mean 3/6.
# R@5 and R@10: 1 everywhere (3 images; every image's best caption is within its first 5).
VECTORS = {"a": (2, 0, 0), "b": (0, 2, 0), "c": (0, 0, 2), "d": (1, 1, 1)}
MULTI = {"a": ["a dog [0 1 1]", "a cat [1 0 0]"], "b": ["a cat [1 0 0]", "two birds [1 1 0]"],
         "c": ["a boat [0 0 1]", "a bird on a boat [0 1 1]"], "d": ["nothing here [1 1 1]"]}
MULTI_EXPECTED = {"i2t_R@1": 11 / 18, "i2t_R@5": 1.0, "i2t_R@10": 1.0,
                  "t2i_R@1": 3 / 6, "t2i_R@5": 1.0, "t2i_R@10": 1.0}
# Single-caption sets (Urban-1k, DOCCI, ShareGPT4V): A: [1 1 0], B: [1 1 0], C: [0 1 1].
# image->text R@1: A ties its caption with B's -> 1/2; B ties all three (0.707) -> 1/3; C -> 1: 11/18.
# text->image R@1: A's and B's captions each tie A and B -> 1/2; C's ties B and C -> 1/2: mean 1/2.
SINGLE = {"a": "a long description of a scene [1 1 0]", "b": "another long description [1 1 0]",
          "c": "a third, different description [0 1 1]", "d": "the missing picture [1 1 1]"}
SINGLE_EXPECTED = {"i2t_R@1": 11 / 18, "i2t_R@5": 1.0, "i2t_R@10": 1.0,
                   "t2i_R@1": 1 / 2, "t2i_R@5": 1.0, "t2i_R@10": 1.0}


def make_flickr30k(root: Path) -> Path:
    images = []
    for key in "abcd":
        images.append({"filename": f"10{ord(key)}.jpg", "imgid": len(images), "split": "test",
                       "sentences": [{"raw": s, "tokens": s.split()} for s in MULTI[key]]})
        if key != "d":
            write_image(root / "flickr30k-images" / f"10{ord(key)}.jpg", VECTORS[key])
    images.append({"filename": "train.jpg", "split": "train", "sentences": [{"raw": "a cat [1 0 0]"}]})
    write_image(root / "flickr30k-images" / "train.jpg", (2, 0, 0))
    # Karpathy's val split sits beside the test split in the same file and image folder: never read.
    images.append({"filename": "val.jpg", "split": "val", "sentences": [{"raw": "a dog [0 1 1]"}]})
    write_image(root / "flickr30k-images" / "val.jpg", (0, 2, 2))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def make_coco(root: Path) -> Path:
    images = []
    for i, key in enumerate("abcd"):
        name = f"COCO_val2014_00000000000{i}.jpg"
        images.append({"filepath": "val2014", "filename": name, "split": "test",
                       "sentences": [{"raw": s} for s in MULTI[key]]})
        if key != "d":
            write_image(root / "val2014" / name, VECTORS[key])
    images.append({"filepath": "val2014", "filename": "COCO_val2014_restval.jpg", "split": "restval",
                   "sentences": [{"raw": "a dog [0 1 1]"}]})
    images.append({"filepath": "val2014", "filename": "COCO_val2014_valsplit.jpg", "split": "val",
                   "sentences": [{"raw": "a bird [1 1 1]"}, {"raw": "a fish [1 0 1]"}]})
    write_image(root / "val2014" / "COCO_val2014_valsplit.jpg", (1, 1, 1))
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def make_urban1k(root: Path) -> Path:
    for i, key in enumerate("abcd", 1):
        # Only the first line is the caption (LLM2CLIP's reader); the second would change every score.
        (root / "caption").mkdir(parents=True, exist_ok=True)
        (root / "caption" / f"{i}.txt").write_text(SINGLE[key] + "\n[5 5 5] a second line\n")
        if key != "d":
            write_image(root / "image" / f"{i}.jpg", VECTORS[key])
    write_image(root / "image" / "7.jpg", (2, 2, 2))  # no caption: reported as skipped
    return root


def make_docci(root: Path) -> Path:
    lines = []
    for i, key in enumerate("abcd"):
        lines.append({"example_id": f"test_{i:05d}", "split": "test", "image_file": f"test_{i:05d}.jpg",
                      "description": SINGLE[key]})
        if key != "d":
            write_image(root / "images" / f"test_{i:05d}.jpg", VECTORS[key])
    lines.insert(1, {"example_id": "train_00000", "split": "train", "image_file": "train_00000.jpg",
                     "description": "a cat [1 0 0]"})
    (root / "docci_descriptions.jsonlines").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def make_sharegpt4v(root: Path, extra: int = 1) -> Path:
    records = []
    for i, key in enumerate("abcd"):
        image = f"coco/train2017/00000000000{i}.jpg"
        records.append({"id": str(i), "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": SINGLE[key]}]})
        if key != "d":
            write_image(root / image, VECTORS[key])
    for j in range(extra):  # past the first n_records: never read
        records.append({"id": f"x{j}", "image": "sam/x.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat [1 0 0]"}]})
    write_image(root / "sam" / "x.jpg", (2, 0, 0))
    (root / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(records))
    return root


# ImageNet in miniature: 3 classes x 2 templates, class embedding = normalised mean of the normalised
# template embeddings. Templates "a photo of a {}." and "art of the {} [0 0 2].":
#   fox [1 0 0] -> mean of [1 0 0] and [1 0 2]/sqrt5 -> ~[0.851 0 0.526]
#   owl [0 1 0] -> ~[0 0.851 0.526];   dog [1 1 0] -> ~[0.628 0.628 0.459]
# images (folder = label): fox: [2 0 0] -> fox (hit); [1 1 0] -> dog (miss); [0 0 2] -> fox and owl
# tie at 0.526 -> 1/2; owl: [0 2 0] -> owl (hit); dog: [2 2 0] -> dog (hit); plus one undecodable file.
# top-1 = (1 + 0 + 1/2 + 1 + 1) / 5 = 0.7 (with the first template alone the [0 0 2] image would tie
# all three classes at 0 -> 1/3); top-5 = 1.
WNIDS = ("n01440764", "n01443537", "n01484850")
CLASS_FILE_NAMES = ("fox [1 0 0]", "owl [0 1 0]", "dog [1 1 0]")
CLASS_IMAGES = {WNIDS[0]: [(2, 0, 0), (1, 1, 0), (0, 0, 2)], WNIDS[1]: [(0, 2, 0)], WNIDS[2]: [(2, 2, 0)]}


def make_imagenet(root: Path) -> tuple[Path, Path, Path]:
    for wnid, vectors in CLASS_IMAGES.items():
        for i, v in enumerate(vectors):
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{wnid}_{i}.JPEG", v)
    (root / "val" / WNIDS[1] / "ILSVRC2012_val_broken.JPEG").write_bytes(b"not a jpeg")
    classnames = root.parent / f"{root.name}_classnames.txt"
    classnames.write_text("\n".join(CLASS_FILE_NAMES) + "\n")
    templates = root.parent / f"{root.name}_templates.txt"
    templates.write_text("a photo of a {}.\nart of the {label} [0 0 2].\n")
    return root, classnames, templates


@pytest.fixture(autouse=True)
def first_four_sharegpt4v_records(monkeypatch):
    """The suite reads the first 1,000 records; the miniature has 4 before the ones it must not read."""
    from llm2clip_fast.eval.suites import sharegpt4v

    monkeypatch.setattr(sharegpt4v, "N_RECORDS", 4)


MAKERS = {"flickr30k": (make_flickr30k, MULTI_EXPECTED), "coco": (make_coco, MULTI_EXPECTED),
          "urban1k": (make_urban1k, SINGLE_EXPECTED), "docci": (make_docci, SINGLE_EXPECTED),
          "sharegpt4v-1k": (make_sharegpt4v, SINGLE_EXPECTED)}


# -- metrics ----------------------------------------------------------------------------------------


def test_multi_positive_hit_rates_by_hand():
    # Best positive 0.9 beaten by one negative (0.95), tied with one negative and another positive:
    # the tie group has 2 positives, 1 negative; first positive within its first j places:
    # j=1: 1 - C(1,1)/C(3,1) = 2/3 -> R@2 = 2/3; j=2: 1 - C(1,2)/C(3,2) = 1 -> R@3 = 1; R@1 = 0.
    sim = torch.tensor([[0.95, 0.9, 0.9, 0.9, 0.1]])
    pos = torch.tensor([[False, True, False, True, True]])
    assert multi_positive_hit_rates(sim, pos, (1, 2, 3)) == pytest.approx({1: 0.0, 2: 2 / 3, 3: 1.0})
    # One positive: the single-target rule.
    sim = torch.rand(7, 9)
    sim[:, 3] = sim[:, 5]  # force ties
    targets = torch.randint(0, 9, (7,))
    onehot = torch.nn.functional.one_hot(targets, 9).bool()
    ks = (1, 2, 3, 5, 20)
    assert multi_positive_hit_rates(sim, onehot, ks) == pytest.approx(topk_hit_rates(sim, targets, ks))
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_hit_rates(sim, torch.zeros(7, 9, dtype=torch.bool), (1,))


def test_multi_caption_retrieval_matches_hand_count_and_chunks():
    emb = FakeEmbedder()
    images = torch.tensor([VECTORS[k] for k in "abc"], dtype=torch.float32)
    captions = [c for k in "abc" for c in MULTI[k]]
    owner = torch.tensor([i for i, k in enumerate("abc") for _ in MULTI[k]])
    texts = emb.embed_texts(captions)
    for chunk in (1, 2, 1024):
        got = multi_caption_retrieval(images, texts, owner, chunk=chunk)
        assert got == pytest.approx(MULTI_EXPECTED), chunk
    with pytest.raises(ValueError, match="at least one caption"):
        multi_caption_retrieval(images, texts[:2], owner[:2])


# -- every retrieval suite in its real layout --------------------------------------------------------


@pytest.mark.parametrize("suite", list(MAKERS))
def test_retrieval_suite_hand_counted(tmp_path, suite):
    make, expected = MAKERS[suite]
    root = make(tmp_path / suite)
    data = read_suite(suite, root)
    assert len(data.images) == 4  # A, B, C and the missing D (train/restval/val/extra records not read)
    result = evaluate_suite(FakeEmbedder(), data, batch_size=2, max_missing_fraction=0.5, progress=False)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert result["n_images"] == 3 and result["n_missing"] == 1
    assert list(result["missing"].values()) == ["missing"]
    assert result["n_texts"] == (6 if suite in ("flickr30k", "coco") else 3)


def test_missing_images_past_the_threshold_stop(tmp_path):
    data = read_suite("docci", make_docci(tmp_path / "docci"))
    with pytest.raises(BadDataError, match="1 of 4 images"):
        evaluate_suite(FakeEmbedder(), data, progress=False)  # default 1%


@pytest.mark.parametrize("suite", ["flickr30k", "coco"])
def test_karpathy_suites_read_the_test_split_only(tmp_path, suite):
    """The fixtures hold train, restval and val images beside the test ones (with their images on disk):
    only the test split's images and captions are read."""
    root = MAKERS[suite][0](tmp_path / suite)
    data = read_suite(suite, root)
    records = json.loads(next(root.glob("dataset_*.json")).read_text())["images"]
    test = [r for r in records if r["split"] == "test"]
    assert [Path(i).name for i in data.image_ids] == [r["filename"] for r in test]
    assert data.captions == [s["raw"] for r in test for s in r["sentences"]]
    assert {r["split"] for r in records} >= {"test", "val"}


@pytest.mark.parametrize("suite", ["flickr30k", "coco"])
def test_blip_test_split_files(tmp_path, suite):
    # LLM2CLIP's evaluation downloads BLIP's copies: [{"image": relative path, "caption": [...]}].
    root = tmp_path / suite
    records = []
    for key in "abcd":
        rel = f"flickr30k-images/{key}.jpg" if suite == "flickr30k" else f"val2014/COCO_val2014_{key}.jpg"
        records.append({"image": rel, "caption": MULTI[key]})
        if key != "d":
            write_image(root / rel if suite == "flickr30k" else root / "images" / rel, VECTORS[key])
    name = "flickr30k_test.json" if suite == "flickr30k" else "coco_karpathy_test.json"
    (root / name).write_text(json.dumps(records))
    result = evaluate_suite(FakeEmbedder(), read_suite(suite, root), max_missing_fraction=0.5, progress=False)
    for key, value in MULTI_EXPECTED.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert result["n_missing"] == 1


def test_reader_details(tmp_path):
    urban = read_suite("urban1k", make_urban1k(tmp_path / "Urban1k"))
    assert urban.captions[0] == SINGLE["a"]  # first line only
    assert urban.skipped == {"image/7.jpg": "no caption file"}
    share = read_suite("sharegpt4v-1k", make_sharegpt4v(tmp_path / "share", extra=2))
    assert len(share.images) == 4  # 6 records, the suite reads the first N_RECORDS (4 here)
    from llm2clip_fast.eval.suites.sharegpt4v import read_sharegpt4v

    assert [p.name for p in read_sharegpt4v(tmp_path / "share", n_records=2).images] == \
        ["000000000000.jpg", "000000000001.jpg"]
    coco = read_suite("coco", make_coco(tmp_path / "coco"))
    assert coco.images[0] == tmp_path / "coco" / "val2014" / "COCO_val2014_000000000000.jpg"
    assert coco.caption_image == [0, 0, 1, 1, 2, 2, 3]


def test_a_suite_found_in_a_parent_folder(tmp_path):
    make_flickr30k(tmp_path / "Flickr30k")
    data = read_suite("flickr30k", tmp_path)
    assert data.root == tmp_path / "Flickr30k"


@pytest.mark.parametrize("suite, expected_path", [
    ("flickr30k", "dataset_flickr30k.json"), ("coco", "dataset_coco.json"), ("urban1k", "image"),
    ("docci", "docci_descriptions.jsonlines"),
    ("sharegpt4v-1k", "share-captioner_coco_lcs_sam_1246k_1107.json"), ("imagenet", "val")])
def test_missing_files_name_the_path_and_the_layout(tmp_path, suite, expected_path):
    with pytest.raises(SuiteLayoutError) as info:
        read_suite(suite, tmp_path)
    message = str(info.value)
    assert str(tmp_path / expected_path) in message and "layout" in message
    assert SUITES[suite].layout in message


def test_images_folder_absent_is_a_layout_error(tmp_path):
    root = make_flickr30k(tmp_path / "f")
    (root / "flickr30k-images").rename(root / "elsewhere")
    with pytest.raises(SuiteLayoutError, match="flickr30k-images"):
        read_suite("flickr30k", root)


# -- ImageNet and class-per-folder sets --------------------------------------------------------------


def test_imagenet_three_classes_two_templates(tmp_path):
    root, classnames, templates = make_imagenet(tmp_path / "imagenet")
    data = read_suite("imagenet", root, classnames=str(classnames), templates=str(templates))
    assert data.class_names == list(CLASS_FILE_NAMES) and len(data.templates) == 2
    result = evaluate_suite(FakeEmbedder(), data, batch_size=4, max_missing_fraction=0.5, progress=False)
    assert result["top1"] == pytest.approx(0.7, abs=1e-9)
    with_workers = evaluate_suite(FakeEmbedder(), data, batch_size=2, workers=2, max_missing_fraction=0.5,
                                  progress=False)
    assert with_workers["top1"] == pytest.approx(0.7, abs=1e-9) and with_workers["n_missing"] == 1
    assert result["top5"] == pytest.approx(1.0)
    assert result["n_images"] == 5 and result["n_missing"] == 1
    assert next(iter(result["missing"].values())).startswith("undecodable")
    assert result["n_classes"] == 3 and result["n_templates"] == 2 and result["n_texts"] == 6
    # The same set as a generic class-per-folder suite, names given as 'folder<TAB>name' lines.
    mapping = tmp_path / "names.tsv"
    mapping.write_text("".join(f"{w}\t{n}\n" for w, n in zip(WNIDS, CLASS_FILE_NAMES)))
    generic = read_suite("classfolders", root, classnames=str(mapping), templates=str(templates))
    assert generic.class_names == data.class_names and generic.labels == data.labels


def test_imagenet_packaged_names_and_templates(tmp_path):
    names, templates = imagenet_class_names(), openai_imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80
    assert names[0] == "tench" and names[-1] == "toilet paper"
    assert templates[0] == "a bad photo of a {}." and all(t.count("{}") == 1 for t in templates)
    root, _, _ = make_imagenet(tmp_path / "imagenet")
    with pytest.raises(SuiteLayoutError, match="found 3 class folders"):
        read_suite("imagenet", root)
    with pytest.raises(ValueError, match="2 names for 3"):
        (tmp_path / "two.txt").write_text("a\nb\n")
        read_suite("imagenet", root, classnames=str(tmp_path / "two.txt"))
    with pytest.raises(ValueError, match="needs --classnames"):
        read_suite("classfolders", root)


# -- running suites: outputs, cache, --suite all ------------------------------------------------------


def test_run_suites_all_writes_json_csv_and_caches(tmp_path):
    root = tmp_path / "benchmarks"
    make_flickr30k(root / "flickr30k")
    make_urban1k(root / "Urban1k")
    _, classnames, templates = make_imagenet(root / "imagenet")
    out = tmp_path / "results"
    emb = FakeEmbedder()
    results = run_suites(emb, "all", root, out=out, model_name="fake", classnames=str(classnames),
                         templates=str(templates), max_missing_fraction=0.5, progress=False)
    assert [r["suite"] for r in results] == ["flickr30k", "urban1k", "imagenet"]
    assert results[0]["i2t_R@1"] == pytest.approx(11 / 18) and results[2]["top1"] == pytest.approx(0.7)
    saved = json.loads((out / "urban1k.json").read_text())
    assert saved["t2i_R@1"] == pytest.approx(0.5) and saved["model"] == "fake"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["suite"] for r in rows] == ["flickr30k", "urban1k", "imagenet"]
    assert math.isclose(float(rows[2]["top1"]), 0.7) and rows[0]["top1"] == ""
    first_images, first_texts = emb.images_embedded, emb.texts_embedded
    assert first_images == 3 + 3 + 5 and first_texts == 6 + 3 + 6

    # Second run: every embedding comes from the cache; the CSV grows by one row per suite.
    again = run_suites(emb, "all", root, out=out, model_name="fake", classnames=str(classnames),
                       templates=str(templates), max_missing_fraction=0.5, progress=False)
    assert (emb.images_embedded, emb.texts_embedded) == (first_images, first_texts)
    assert all(r["cached"] == {"images": True, "texts": True} for r in again)
    for a, b in zip(results, again):
        assert {k: v for k, v in a.items() if "R@" in k or "top" in k} == \
            {k: v for k, v in b.items() if "R@" in k or "top" in k}
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 6
    assert (out / "results.csv").read_bytes().count(b"\r") == 0

    # A changed caption re-embeds that suite's texts only.
    (root / "Urban1k" / "caption" / "1.txt").write_text("a changed caption [0 0 1]\n")
    third = run_suites(emb, "urban1k", root / "Urban1k", out=out, model_name="fake",
                       max_missing_fraction=0.5, progress=False)
    assert third[0]["cached"] == {"images": True, "texts": False}
    assert emb.texts_embedded == first_texts + 3


def test_suite_all_with_nothing_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no suite folder"):
        find_suites(tmp_path)


# -- end to end: the command on a tiny saved model ----------------------------------------------------


def test_eval_suite_command_on_a_saved_model(tmp_path, capsys):
    from PIL import Image

    from llm2clip_fast.data.image_transforms import clip_image_transform
    from llm2clip_fast.train.__main__ import main

    model = tiny_clip_tower_model().eval()
    model.save_pretrained(tmp_path / "model")
    root = make_coco(tmp_path / "coco")
    argv = ["eval", "--model", str(tmp_path / "model"), "--suite", "coco", "--root", str(root),
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--max-missing-fraction", "0.3",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "i2t R@1" in printed and "coco" in printed
    result = json.loads((tmp_path / "model" / "eval" / "coco.json").read_text())

    # The same numbers from the model's own encoders and the metric function.
    transform = clip_image_transform(model.image_size, train=False)
    paths = [root / "val2014" / f"COCO_val2014_00000000000{i}.jpg" for i in range(3)]
    with torch.no_grad():
        pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        images = model.encode_image(pixels, normalize=True)
        texts = model.encode_captions([c for k in "abc" for c in MULTI[k]], batch_size=4)
    expected = multi_caption_retrieval(images, texts, torch.tensor([0, 0, 1, 1, 2, 2]))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert result["n_missing"] == 1 and result["n_images"] == 3 and result["n_texts"] == 6

    assert main(argv) == 0  # second run: from the cache
    assert "(cached)" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "model" / "eval" / "results.csv").open()))
    assert len(rows) == 2 and rows[1]["cached"] == "1" and rows[0]["cached"] == "0"


def test_eval_suite_command_errors(tmp_path):
    from llm2clip_fast.train.__main__ import cli

    tiny_clip_tower_model().save_pretrained(tmp_path / "model")
    base = ["eval", "--model", str(tmp_path / "model")]
    assert cli([*base, "--suite", "coco", "--root", str(tmp_path)]) == 3  # no dataset_coco.json
    assert cli([*base, "--suite", "coco"]) == 2  # no --root
    assert cli([*base, "--suite", "nope", "--root", str(tmp_path)]) == 2
    assert cli([*base]) == 2  # neither --data nor --suite


def test_llm_adapter_model_reads_captions_through_its_llm_and_caches(tmp_path, monkeypatch):
    from _tiny_llama import write_tiny_llama

    from llm2clip_fast.eval import text_encoder as eval_module
    from llm2clip_fast.eval.suites import ModelEmbedder
    from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
    from llm2clip_fast.models.vision import VisionTower

    llm = write_tiny_llama(tmp_path / "llm")
    torch.manual_seed(0)
    vision = VisionTower.from_config("clip", {"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                              "intermediate_size": 64, "num_hidden_layers": 1,
                                              "num_attention_heads": 2})
    config = LLM2CLIPConfig(vision=vision.config_dict(), embed_dim=16, text_tower="llm-adapter", llm_dim=32,
                            adapter={"num_blocks": 1, "expansion": 2, "dropout": 0.0},
                            llm={"path": str(llm), "pooling": "mean"})
    LLM2CLIPModel(config, vision_tower=vision).save_pretrained(tmp_path / "model")
    root = make_urban1k(tmp_path / "urban1k")
    embedder = ModelEmbedder(tmp_path / "model")
    (result,) = run_suites(embedder, "urban1k", root, out=tmp_path / "out", model_name="m",
                           max_missing_fraction=0.3, progress=False)

    encoder = eval_module.load_text_encoder(embedder.model)
    with torch.no_grad():
        texts = embedder.model.encode_captions([SINGLE[k] for k in "abc"], encoder, batch_size=2)
    from PIL import Image

    from llm2clip_fast.data.image_transforms import clip_image_transform

    transform = clip_image_transform(32, train=False)
    paths = [root / "image" / f"{i}.jpg" for i in (1, 2, 3)]
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        images = embedder.model.encode_image(pixels, normalize=True)
    expected = multi_caption_retrieval(images, texts, torch.arange(3))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-5), key

    # A second run, from a fresh embedder, is served from the cache without loading the LLM.
    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded for a cached run")

    monkeypatch.setattr(eval_module, "load_text_encoder", no_llm)
    (again,) = run_suites(ModelEmbedder(tmp_path / "model"), "urban1k", root, out=tmp_path / "out",
                          model_name="m", max_missing_fraction=0.3, progress=False)
    assert again["cached"] == {"images": True, "texts": True} and again["i2t_R@1"] == result["i2t_R@1"]


def test_suite_on_a_model_converted_from_a_released_checkpoint(tmp_path):
    """An HF-format LLM2CLIP release (official key names, tiny sizes) -> convert -> eval --suite: the
    numbers equal the metric on the official adapter's forward over the LLM's pooled embeddings."""
    from _llm2clip_official_reference import TextProj
    from _llm2clip_release import EMBED_DIM, VISION, _perturb, _release_state, _write_release
    from _tiny_llama import write_tiny_llama
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llm2clip_fast.convert.__main__ import main as convert_main
    from llm2clip_fast.data.image_transforms import clip_image_transform
    from llm2clip_fast.eval import text_encoder as eval_module
    from llm2clip_fast.models.llm2clip import LLM2CLIPModel
    from llm2clip_fast.train.__main__ import main as train_main

    llm = write_tiny_llama(tmp_path / "llm")  # hidden size 32: the adapter's input
    torch.manual_seed(3)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    projection = torch.nn.Linear(VISION["hidden_size"], EMBED_DIM, bias=False)
    adapter = TextProj(embedding_dim=32, output_dim=EMBED_DIM, expansion_factor=2, num_layers_text=2).eval()
    _perturb(tower, 4)
    _perturb(adapter, 5)
    src = _write_release(tmp_path / "release", _release_state(tower, projection, adapter, torch.tensor(3.9)))
    assert convert_main(["--from", "llm2clip-hf", str(src), "--out", str(tmp_path / "converted"),
                         "--llm", str(llm)]) == 0
    root = make_urban1k(tmp_path / "urban1k")
    assert train_main(["eval", "--model", str(tmp_path / "converted"), "--suite", "urban1k", "--root",
                       str(root), "--batch-size", "2", "--workers", "0", "--device", "cpu",
                       "--max-missing-fraction", "0.3", "--no-progress"]) == 0
    result = json.loads((tmp_path / "converted" / "eval" / "urban1k.json").read_text())

    # The same metric from the official forward: LLM pooled embeddings -> official TextProj (with its
    # default L2 step, the conversion's default since issue 27), and the source tower + projection.
    model = LLM2CLIPModel.from_pretrained(tmp_path / "converted")
    encoder = eval_module.load_text_encoder(model)
    transform = clip_image_transform(VISION["image_size"], train=False)
    paths = [root / "image" / f"{i}.jpg" for i in (1, 2, 3)]
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        pooled = encoder.encode([SINGLE[k] for k in "abc"], batch_size=2).float()
        texts = torch.nn.functional.normalize(adapter(pooled, l2_norm=True), dim=-1)
        images = projection(tower(pixel_values=pixels).pooler_output)
        images = torch.nn.functional.normalize(images, dim=-1)
    expected = multi_caption_retrieval(images, texts, torch.arange(3))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-5), key
    assert result["n_images"] == 3


def test_suite_on_a_converted_eva_clip_checkpoint_and_after_stage2_from_it(tmp_path):
    """The README's EVA-CLIP path: an EVA-CLIP state dict (official key names, tiny sizes) -> convert
    --from eva-clip --llm -> eval --suite, the numbers equal to the metric on the official forwards; then
    stage 2 continues from the converted folder on an embedding cache of the same LLM, and its model
    evaluates through the LLM that run recorded."""
    from _timm_environment import require_timm

    require_timm()  # puts timm's torchvision on the path too, for the official eval transform
    from _eva_clip_checkpoint import TINY, _config_file, _official, _state, _write
    from _tiny_llama import write_tiny_llama
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    from llm2clip_fast.convert.__main__ import main as convert_main
    from llm2clip_fast.data.demo import write_demo
    from llm2clip_fast.eval import text_encoder as eval_module
    from llm2clip_fast.models.llm2clip import LLM2CLIPModel
    from llm2clip_fast.train.__main__ import main as train_main

    llm = write_tiny_llama(tmp_path / "llm")  # hidden size 32: the adapter's input
    visual, adapter, logit_scale = _official(seed=8, llm_dim=32)
    src = _write(tmp_path / "eva.safetensors", _state(visual, adapter, logit_scale))
    converted = tmp_path / "converted"
    assert convert_main(["--from", "eva-clip", str(src), "--out", str(converted), "--model-config",
                         _config_file(tmp_path), "--llm", str(llm)]) == 0
    root = make_urban1k(tmp_path / "urban1k")
    # Textured, non-square pictures in place of the solid ones, so that resize and crop matter.
    g = torch.Generator().manual_seed(9)
    for i in (1, 2, 3):
        noise = torch.randint(0, 256, (37, 45, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(noise).save(root / "image" / f"{i}.jpg", quality=95)
    suite = ["--suite", "urban1k", "--root", str(root), "--batch-size", "2", "--num-workers", "0",
             "--device", "cpu", "--max-missing-fraction", "0.3", "--quiet"]
    assert train_main(["eval", "--model", str(converted), *suite]) == 0
    result = json.loads((converted / "eval" / "urban1k.json").read_text())

    # The same metric from the official forwards: the LLM's pooled embeddings -> the official TextProj
    # with its default l2_norm=True (CustomCLIP.encode_text on cached embeddings), the official
    # EVAVisionTransformer (head included) on the official eval transform (llm2clip/eva_clip/transform.py
    # image_transform, is_train=False: torchvision's bicubic short-side resize, centre crop, OpenAI
    # mean/std).
    encoder = eval_module.load_text_encoder(LLM2CLIPModel.from_pretrained(converted))
    image_size = TINY["vision_cfg"]["image_size"]
    openai_mean, openai_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    transform = Compose([Resize(image_size, interpolation=InterpolationMode.BICUBIC), CenterCrop(image_size),
                         lambda image: image.convert("RGB"), ToTensor(), Normalize(openai_mean, openai_std)])
    pixels = torch.stack([transform(Image.open(root / "image" / f"{i}.jpg")) for i in (1, 2, 3)])
    with torch.no_grad():
        pooled = encoder.encode([SINGLE[k] for k in "abc"], batch_size=2).float()
        texts = torch.nn.functional.normalize(adapter(pooled), dim=-1)
        images = torch.nn.functional.normalize(visual(pixels), dim=-1)
    expected = multi_caption_retrieval(images, texts, torch.arange(3))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-5), key
    assert result["n_images"] == 3
    # Three items leave the recalls few values to take, so the vectors the command embedded (its cache)
    # are compared too: fp32, timm's SDPA and fused RoPE against the official order of operations.
    cache = converted / "eval" / "cache"
    for side, official in (("images", images), ("texts", texts)):
        (file,) = cache.glob(f"*-{side}-*.pt")
        embedded = torch.load(file, weights_only=True)["embeddings"]
        assert float((torch.nn.functional.normalize(embedded, dim=-1) - official).abs().max()) <= 1e-5, side

    # Stage 2 from the converted folder, on captions embedded by the same LLM (as README's commands).
    data = write_demo(tmp_path / "demo", n_train=16, n_val=0, n_long_detail_groups=0, image_size=32)["train"]
    embeddings, run = tmp_path / "llm-cache", tmp_path / "run"
    assert train_main(["embed", "--llm", str(llm), "--data", data, "--out", str(embeddings), "--dtype",
                       "fp32", "--batch-size", "8", "--max-length", "32", "--quiet"]) == 0
    assert train_main(["stage2", "--init-model", str(converted), "--embeddings", str(embeddings), "--data",
                       data, "--out", str(run), "--batch-size", "8", "--steps", "2", "--num-workers", "0",
                       "--lr", "1e-3", "--no-progress"]) == 0
    trained = LLM2CLIPModel.from_pretrained(run / "model")
    assert trained.config.vision["kind"] == "timm" and trained.config.adapter["input_norm"] == "l2"
    assert trained.config.llm["path"] == str(llm.resolve()) and trained.config.llm["max_length"] == 32
    assert train_main(["eval", "--model", str(run / "model"), *suite]) == 0
    again = json.loads((run / "model" / "eval" / "urban1k.json").read_text())
    assert again["n_images"] == 3 and set(expected) <= set(again)
