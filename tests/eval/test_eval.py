"""Retrieval metrics against hand-computed cases, and the eval sub-command on a tiny saved model."""

from __future__ import annotations

import pytest
import torch
from _tiny_llm2clip import tiny_clip_tower_model

from llm2clip_fast.eval.retrieval_metrics import (
    caption_retrieval_accuracy,
    cosine_similarity_matrix,
    image_text_retrieval,
    topk_hit_rates,
    zero_shot_accuracy,
)


def test_topk_hand_computed():
    # Row 0: target 0 is best -> rank 1. Row 1: target 2 is beaten by two -> rank 3.
    # Row 2: target 1 beaten by one (0.9) -> rank 2.
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.8, 0.7, 0.1],
                        [0.9, 0.5, 0.1]])
    rates = topk_hit_rates(sim, torch.tensor([0, 2, 1]), (1, 2, 3))
    assert rates == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})


def test_ties_count_as_expected_random_tie_break():
    # Target tied with two negatives, beaten by none: P(top-1)=1/3, P(top-2)=2/3, P(top-3)=1.
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    rates = topk_hit_rates(sim, torch.tensor([1]), (1, 2, 3, 4))
    assert rates == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: 1.0})
    # Beaten by one and tied with one: rank 2 or 3.
    sim = torch.tensor([[0.9, 0.5, 0.5]])
    assert topk_hit_rates(sim, torch.tensor([2]), (1, 2, 3)) == pytest.approx({1: 0.0, 2: 0.5, 3: 1.0})


def test_collapsed_embeddings_score_chance_not_perfect():
    n = 8
    same = torch.ones(n, 4)
    out = image_text_retrieval(same, same, ks=(1, 5))
    assert out["i2t_R@1"] == pytest.approx(1 / n) and out["t2i_R@1"] == pytest.approx(1 / n)
    assert out["i2t_R@5"] == pytest.approx(5 / n)


def test_k_larger_than_gallery_finds_everything():
    sim = torch.tensor([[0.1, 0.9], [0.3, 0.2]])
    assert topk_hit_rates(sim, torch.tensor([0, 1]), (1, 10)) == pytest.approx({1: 0.0, 10: 1.0})


def test_image_text_retrieval_directions_differ():
    # Image 0 is closest to text 1 but text 0's closest image is image 0.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 1.2], [0.9, 1.0]])
    out = image_text_retrieval(img, txt, ks=(1,))
    sim = cosine_similarity_matrix(img, txt)
    i2t = (sim.argmax(1) == torch.arange(2)).float().mean().item()
    t2i = (sim.argmax(0) == torch.arange(2)).float().mean().item()
    assert out == pytest.approx({"i2t_R@1": i2t, "t2i_R@1": t2i})
    assert i2t != t2i


def test_cra_and_zero_shot():
    short = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    long = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-1.0, 0.0]])
    assert caption_retrieval_accuracy(short, long) == pytest.approx(2 / 3)
    images = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.9, 0.0], [0.0, 1.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 1, 1])) == pytest.approx(3 / 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="paired"):
        image_text_retrieval(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="dimension"):
        cosine_similarity_matrix(torch.zeros(3, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="targets"):
        topk_hit_rates(torch.zeros(2, 2), torch.tensor([0, 5]), (1,))
    with pytest.raises(ValueError, match="ks"):
        topk_hit_rates(torch.zeros(2, 2), torch.tensor([0, 1]), (0,))
    with pytest.raises(TypeError):
        image_text_retrieval([[1.0]], torch.zeros(1, 1))


# -- the eval sub-command on a tiny saved model --------------------------------------------------

COLOURS = {"red": (230, 30, 30), "blue": (30, 30, 230), "green": (30, 200, 30)}


def _write_tiny_manifest(folder):
    import json

    from PIL import Image

    rows = []
    for i in range(7):
        name = list(COLOURS)[i % 3]
        Image.new("RGB", (40, 36), COLOURS[name]).save(folder / f"{i}.png")
        rows.append({"key": f"k{i}", "image": f"{i}.png", "short": f"a {name} square",
                     "long": f"a {name} square, picture number {i}, " + "with a plain background " * 4,
                     "label": name})
    path = folder / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_eval_command_on_a_saved_model(tmp_path, capsys):
    import json

    from llm2clip_fast.data.sources import open_source
    from llm2clip_fast.eval.held_out import collect_eval_set, evaluate
    from llm2clip_fast.train.__main__ import main

    manifest = _write_tiny_manifest(tmp_path)
    model = tiny_clip_tower_model().eval()
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "results" / "val.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(manifest),
                 "--batch-size", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "i2t R@1" in printed and "zero-shot" in printed
    results = json.loads(out.read_text())
    assert results["n"] == 7 and results["n_classes"] == 3 and results["text_tower"] == "clip"
    assert results["i2t_R@10"] == 1.0  # K > N

    # The same numbers as the metric functions on embeddings computed by hand from the model.
    eval_set = collect_eval_set(open_source(str(manifest)), model.image_size)
    with torch.no_grad():
        images = model.encode_image(eval_set["pixel_values"], normalize=True)
        texts = model.encode_captions(eval_set["captions"]["long"], batch_size=3)
        shorts = model.encode_captions(eval_set["captions"]["short"], batch_size=3)
    expected = image_text_retrieval(images, texts)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
    assert results["cra"] == pytest.approx(caption_retrieval_accuracy(shorts, texts), abs=1e-6)
    # Zero-shot counted by hand: an image is right when its own class's prompt is the most similar.
    from llm2clip_fast.eval.held_out import ZERO_SHOT_TEMPLATE

    classes = sorted(set(eval_set["labels"]))
    with torch.no_grad():
        prompts = model.class_prompt_embeddings(classes, None, templates=(ZERO_SHOT_TEMPLATE,)).float()
    sims = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(prompts, dim=-1).t()
    assert sims.topk(2, dim=1).values.diff(dim=1).abs().min() > 1e-5  # no ties to break
    hits = sum(classes[int(row.argmax())] == label for row, label in zip(sims, eval_set["labels"]))
    assert results["zero_shot"] == pytest.approx(hits / 7, abs=1e-9)
    again = evaluate(model, eval_set, caption="short", batch_size=5)
    assert again["caption"] == "short" and again["cra"] == pytest.approx(results["cra"], abs=1e-6)


def test_eval_bad_arguments(tmp_path):
    from llm2clip_fast.eval.held_out import evaluate_model_dir

    manifest = _write_tiny_manifest(tmp_path)
    tiny_clip_tower_model().save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="caption"):
        evaluate_model_dir(tmp_path / "model", str(manifest), caption="medium")
    with pytest.raises(FileNotFoundError, match="not a saved"):
        evaluate_model_dir(tmp_path / "nothing", str(manifest))


def test_float_noise_below_the_tolerance_is_a_tie():
    sim = torch.tensor([[0.5, 0.5 + 3e-7, 0.1]])
    assert topk_hit_rates(sim, torch.tensor([0]), (1,)) == pytest.approx({1: 0.5})
    assert topk_hit_rates(sim, torch.tensor([0]), (1,), tie_tolerance=0.0) == pytest.approx({1: 0.0})


def test_eval_device_means_what_it_means_in_the_trainers(tmp_path, monkeypatch):
    import json

    from llm2clip_fast.eval.suites import ModelEmbedder
    from llm2clip_fast.train.__main__ import main

    manifest = _write_tiny_manifest(tmp_path)
    tiny_clip_tower_model().save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Resolved before anything loads, for --data and --suite alike, with the trainers' message.
    for what in (["--data", str(manifest)], ["--suite", "urban1k", "--root", str(tmp_path / "none")]):
        with pytest.raises(ValueError, match=r"--device cuda asked for, but no CUDA device is available"):
            main(["eval", "--model", model, *what, "--device", "cuda"])
        with pytest.raises(ValueError, match=r"--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
            main(["eval", "--model", model, *what, "--device", "gpu"])
    with pytest.raises(ValueError, match=r"--device cuda:0 asked for, but no CUDA device"):
        ModelEmbedder(model, device="cuda:0")
    assert ModelEmbedder(model, device="auto").device == torch.device("cpu")
    out = tmp_path / "cpu.json"
    argv = ["eval", "--model", model, "--data", str(manifest), "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["n"] == 7
