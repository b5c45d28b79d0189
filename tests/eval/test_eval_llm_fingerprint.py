"""Eval notices an LLM retrained in place (issue 28, item 3): the hashes of the LLM's files travel from
embed's cache into the stage-2 model (``config.llm.weights_sha256``) and into a model converted with a
local ``--llm``; eval compares them with the LLM it is about to load and refuses a mismatch (exit 6)
unless ``--allow-llm-change``. Tiny Llama, tiny demo set."""

from __future__ import annotations

import json
import logging

import pytest
from _tiny_llama import write_tiny_llama

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.models.llm2clip import LLM2CLIPModel
from llm2clip_fast.train.__main__ import cli, exit_code_for
from llm2clip_fast.train.__main__ import main as train_main

RECORD_KEY = "weights_sha256"


def _fingerprint(llm):
    from llm2clip_fast.models.llm_fingerprint import llm_weights_fingerprint

    return llm_weights_fingerprint(llm)


def _changed_error():
    from llm2clip_fast.models.llm_fingerprint import LLMChangedError

    return LLMChangedError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm_fingerprint")
    llm = write_tiny_llama(root / "llm")
    data = write_demo(root / "data", n_train=24, n_val=0, n_long_detail_groups=0, image_size=32,
                      splits=("train",))["train"]
    assert train_main(["embed", "--llm", str(llm), "--data", data, "--out", str(root / "cache"), "--dtype",
                       "fp32", "--batch-size", "8", "--max-length", "24", "--quiet"]) == 0
    assert train_main(["stage2", "--embeddings", str(root / "cache"), "--data", data, "--out",
                       str(root / "s2"),
                       "--vision-preset", "micro", "--embed-dim", "16", "--adapter-blocks", "1",
                       "--batch-size", "8", "--steps", "1", "--num-workers", "0", "--no-progress"]) == 0
    return {"root": root, "llm": llm, "data": data, "model": root / "s2" / "model"}


def _eval(trained, *extra):
    return ["eval", "--model", str(trained["model"]), "--data", trained["data"], "--batch-size", "8",
            "--device", "cpu", *extra]


def test_the_model_records_its_llms_file_hashes(trained):
    recorded = json.loads((trained["model"] / "config.json").read_text())["llm"][RECORD_KEY]
    assert recorded == _fingerprint(trained["llm"])
    assert any(name.endswith("model.safetensors") for name in recorded)


def test_eval_refuses_an_llm_retrained_in_place_unless_allowed(trained, tmp_path, capsys, monkeypatch,
                                                                caplog):
    assert train_main(_eval(trained, "--out", str(tmp_path / "before.json"))) == 0
    before = json.loads((tmp_path / "before.json").read_text())
    llm = trained["llm"]
    saved = (llm / "model.safetensors").read_bytes()
    try:
        # stage1 --overwrite into the same folder, in effect: same path, new weights.
        from safetensors.torch import load_file, save_file

        weights = load_file(str(llm / "model.safetensors"))
        first = sorted(weights)[0]
        weights[first] = weights[first] + 0.5
        save_file(weights, str(llm / "model.safetensors"), metadata={"format": "pt"})
        monkeypatch.delenv("LLM2CLIP_DEBUG", raising=False)
        capsys.readouterr()
        assert cli(_eval(trained)) == 6
        err = capsys.readouterr().err
        assert f"the LLM {llm} is not the one the model's adapter was trained on" in err
        assert "changed: 0/model.safetensors" in err and "--allow-llm-change" in err
        assert "Traceback" not in err
        with pytest.raises(_changed_error()):
            train_main(_eval(trained))
        with caplog.at_level(logging.WARNING):
            allowed = _eval(trained, "--allow-llm-change", "--out", str(tmp_path / "after.json"))
            assert train_main(allowed) == 0
        assert "evaluating with it anyway (--allow-llm-change)" in caplog.text
        after = json.loads((tmp_path / "after.json").read_text())
        assert after["n"] == before["n"]
    finally:
        (llm / "model.safetensors").write_bytes(saved)
    assert train_main(_eval(trained)) == 0  # the original weights are accepted again


def test_an_llm_moved_elsewhere_with_the_same_files_is_accepted(trained, tmp_path):
    import shutil

    moved = tmp_path / "moved-llm"
    shutil.copytree(trained["llm"], moved)
    assert train_main(_eval(trained, "--llm", str(moved))) == 0
    (moved / "tokenizer.json").write_text((moved / "tokenizer.json").read_text().replace("circle", "circles"))
    with pytest.raises(_changed_error(), match=r"changed: 0/tokenizer\.json"):
        train_main(_eval(trained, "--llm", str(moved)))


def test_a_model_without_a_fingerprint_is_evaluated_with_a_warning(trained, tmp_path, caplog):
    model = LLM2CLIPModel.from_pretrained(trained["model"])
    model.config.llm.pop(RECORD_KEY, None)
    model.save_pretrained(tmp_path / "old-model")
    with caplog.at_level(logging.WARNING):
        assert train_main(["eval", "--model", str(tmp_path / "old-model"), "--data", trained["data"],
                           "--batch-size", "8", "--device", "cpu"]) == 0
    assert "the model records no fingerprint of its LLM" in caplog.text


def test_convert_with_a_local_llm_records_its_fingerprint(trained, tmp_path):
    from llm2clip_fast.convert.__main__ import recorded_llm

    assert recorded_llm(str(trained["llm"])) == {"path": str(trained["llm"]),
                                                 RECORD_KEY: _fingerprint(trained["llm"])}
    assert recorded_llm(str(tmp_path / "not-here")) == {"path": str(tmp_path / "not-here")}


def test_a_changed_llm_has_the_exit_code_of_stale_embeddings():
    assert exit_code_for(_changed_error()("x")) == 6


def test_suites_check_the_llm_before_embedding_texts(trained, tmp_path):
    from llm2clip_fast.eval.suites import ModelEmbedder

    llm = trained["llm"]
    saved = (llm / "config.json").read_text()
    try:
        config = json.loads(saved)
        config["rms_norm_eps"] = 1e-3
        (llm / "config.json").write_text(json.dumps(config))
        with pytest.raises(_changed_error(), match=r"changed: 0/config\.json"):
            ModelEmbedder(trained["model"]).embed_texts(["a red circle"])
        allowed = ModelEmbedder(trained["model"], allow_llm_change=True)
        assert allowed.embed_texts(["a red circle"]).shape == (1, 16)
    finally:
        (llm / "config.json").write_text(saved)
