"""``--caption`` as a weighted mix: parsing and its errors, the seeded per-sample draw, exact loader
resumption with a mix, and stage 2 with ``--caption short:0.5,long:0.5`` (resolved mix saved, kill +
resume bit-identical)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from _stage2_runs import final_state, logged_losses, make_demo, stage2_args, stop_stage2_in_step

from llm2clip_fast.data import build_loader, open_source
from llm2clip_fast.data.caption_mix import CaptionMix, CaptionSpecError
from llm2clip_fast.data.loader import sample_rng
from llm2clip_fast.train import stage2
from llm2clip_fast.train.__main__ import main as train_main


def test_single_names_and_random_are_mixes_that_draw_as_before():
    # These were plain strings before CaptionMix carried every shape; what they draw is pinned in
    # test_caption_draw_pins.py. A single name always trains on itself; 'random' names the data's captions.
    long = CaptionMix.parse("long")
    assert long.names == ("long",) and long.weights == (1.0,) and long.text == "long"
    assert long.choose(sample_rng(0, 0, "k", "caption")) == "long"
    random = CaptionMix.parse(" random ")
    assert random.is_random and not random.resolved and random.text == " random "
    assert random.resolve(["short", "long"]) == CaptionMix.among(["short", "long"])


@pytest.mark.parametrize("spec, names, weights", [
    ("short:0.5,long:0.5", ("short", "long"), (0.5, 0.5)),
    ("short:1, long:3", ("short", "long"), (0.25, 0.75)),
    ("short,long,medium", ("short", "long", "medium"), (1 / 3, 1 / 3, 1 / 3)),
    ("long:2", ("long",), (1.0,)),
    ("short:1e-3,long:1e-3", ("short", "long"), (0.5, 0.5)),
])
def test_mixes_are_normalised_in_the_order_given(spec, names, weights):
    mix = CaptionMix.parse(spec)
    assert isinstance(mix, CaptionMix) and mix.names == names
    assert mix.weights == pytest.approx(weights, abs=1e-12) and sum(mix.weights) == pytest.approx(1.0)


@pytest.mark.parametrize("spec, match", [
    ("short:0.5,", "item '' has no caption name"),
    (":0.5,long:0.5", "item ':0.5' has no caption name"),
    ("short:abc,long:1", "the weight of 'short' must be a number, got 'abc'"),
    ("short:,long:1", "the weight of 'short' must be a number, got ''"),
    ("short:0,long:1", "the weight of 'short' must be finite and > 0, got 0"),
    ("short:-1,long:1", "must be finite and > 0, got -1"),
    ("short:nan,long:1", "must be finite and > 0, got nan"),
    ("short:inf,long:1", "must be finite and > 0, got inf"),
    ("short:1,short:2", "'short' is named twice"),
    ("random:1,long:1", "'random' stands alone"),
    ("", "needs a caption name"),
])
def test_bad_specs_name_the_flag_and_the_problem(spec, match):
    with pytest.raises(CaptionSpecError, match=match) as err:
        CaptionMix.parse(spec)
    assert str(err.value).startswith("--caption")


def test_the_draw_is_the_first_uniform_against_the_cumulative_weights():
    mix = CaptionMix.parse("short:1,long:3")
    keys = [f"k{i}" for i in range(4000)]
    for key in keys[:50]:
        u = sample_rng(7, 2, key, "caption").random()
        assert mix.choose(sample_rng(7, 2, key, "caption")) == ("short" if u < 0.25 else "long")
    counts = Counter(mix.choose(sample_rng(7, 2, k, "caption")) for k in keys)
    # Binomial(4000, 0.25): sd ~27; 6 sd either side.
    assert abs(counts["short"] - 1000) < 165, counts


N_SAMPLES, BATCH = 29, 3


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rows = [{"key": f"s{i:03d}", "image": f"{i}.png", "short": f"short {i}", "long": f"long {i}",
             "medium": f"medium {i}"} for i in range(N_SAMPLES)]
    path = tmp_path_factory.mktemp("mix") / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return open_source(path)


def _batches(source, mix, **kw):
    loader = build_loader(source, batch_size=BATCH, with_images=False, seed=5, caption=mix, **kw)
    return [(b["batch_index"], b["keys"], b["caption_names"], b["captions"]) for b in loader]


def test_loader_draws_each_sample_from_its_seed_and_resumes_exactly(source):
    mix = CaptionMix.parse("short:0.5,long:0.5")
    for epoch in (0, 1):
        full = _batches(source, mix, epoch=epoch)
        chosen = {k: n for _, keys, names, _ in full for k, n in zip(keys, names)}
        assert chosen == {k: mix.choose(sample_rng(5, epoch, k, "caption")) for k in chosen}
        assert set(chosen.values()) == {"short", "long"}  # never the unlisted 'medium'
        for _, keys, names, texts in full:
            assert texts == [f"{n} {int(k[1:])}" for k, n in zip(keys, names)]
        resumed = _batches(source, mix, epoch=epoch, start_batch=3, num_workers=2)
        assert resumed == full[3:]
    with pytest.raises(CaptionSpecError, match=r"caption 'short:0.5,large:0.5': 'large' is not a caption of "
                                               r"the source; it has \['short', 'long', 'medium'\]"):
        build_loader(source, batch_size=BATCH, with_images=False, caption=CaptionMix.parse("short,large"))


def test_streamed_shards_draw_the_same_per_sample_captions(tmp_path):
    import io
    import tarfile

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    for shard in range(2):
        with tarfile.open(tmp_path / f"d-{shard}.tar", "w") as tar:
            for i in range(shard * 7, shard * 7 + 7):
                meta = json.dumps({"short": f"short {i}", "long": f"long {i}"}).encode()
                for member, data in ((f"k{i:02d}.png", png.getvalue()), (f"k{i:02d}.json", meta)):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    mix = CaptionMix.parse("short:0.3,long:0.7")
    stream = open_source(str(tmp_path / "d-{0..1}.tar"), streaming=True)
    loader = build_loader(stream, batch_size=4, with_images=False, seed=3, epoch=1, caption=mix)
    chosen = {k: n for b in loader for k, n in zip(b["keys"], b["caption_names"])}
    assert len(chosen) == 14
    assert chosen == {k: mix.choose(sample_rng(3, 1, k, "caption")) for k in chosen}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    return make_demo(tmp_path_factory.mktemp("mix_stage2"))


MIX = ("--caption", "short:0.5,long:0.5", "--save-every", "2", "--adapter-dropout", "0.1")


def test_stage2_mix_saves_the_resolved_mix_and_resumes_bit_identically(demo, tmp_path, monkeypatch):
    seen: list[str] = []
    real_inputs = stage2.text_inputs_of

    def spy(batch, *a, **k):
        seen.extend(batch["caption_names"])
        return real_inputs(batch, *a, **k)

    monkeypatch.setattr(stage2, "text_inputs_of", spy)
    assert train_main(stage2_args(demo, tmp_path / "full", *MIX, steps=6)) == 0
    assert set(seen) == {"short", "long"}
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["caption"] == "short:0.5,long:0.5" and saved["caption_mix"] == {"short": 0.5, "long": 0.5}

    stop_stage2_in_step(monkeypatch, stage2_args(demo, tmp_path / "stopped", *MIX, steps=6), 5)
    assert train_main(stage2_args(demo, tmp_path / "stopped", *MIX, "--resume", steps=6)) == 0
    assert logged_losses(tmp_path / "stopped") == logged_losses(tmp_path / "full")
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "stopped")
    assert [k for k in a if not a[k].equal(b[k])] == []
    with pytest.raises(ValueError, match="caption"):  # a resume must keep the mix
        train_main(stage2_args(demo, tmp_path / "stopped", "--caption", "short:0.4,long:0.6",
                               "--save-every", "2", "--adapter-dropout", "0.1", "--resume", steps=6))


@pytest.mark.parametrize("spec, match", [
    ("short:0.5,medium:0.5", r"--caption 'short:0.5,medium:0.5': 'medium' is not a caption of the data; "
                             r"it has \['short', 'long'\]"),
    ("short:0.5,long:-0.5", r"--caption 'short:0.5,long:-0.5': the weight of 'long' must be finite and > 0"),
    ("short;long", r"--caption 'short;long' is not a caption of the data"),
])
def test_stage2_refuses_bad_mixes_before_training(demo, tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        train_main(stage2_args(demo, tmp_path / "run", "--caption", spec))
    assert not (tmp_path / "run" / "checkpoints").exists()
