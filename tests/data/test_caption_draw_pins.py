"""The caption each sample draws, pinned per ``--caption`` shape: part of the checkpoint contract.

An exact resume re-draws every sample's caption from (seed, epoch, key, mix); a change in the draw would
make a resumed run of an existing checkpoint train on other captions than the interrupted one. Every
expected value below was computed with the code BEFORE ``CaptionMix`` carried every shape (commit
569ec5c, where ``build_loader`` took plain strings, lists or a ``CaptionMix`` and stage 2's
``resolve_caption`` turned the flag into those), and is hard-coded here; do not recompute it from the
code under test.

Draw strings hold the first letter of each sample's caption name (s/l/m), samples in key order.
"""

from __future__ import annotations

import json

import pytest

from llm2clip_fast.data import build_loader, open_source
from llm2clip_fast.data.caption_mix import CaptionMix


def _write(folder, n, names):
    rows = [{"key": f"s{i:03d}", "image": f"{i}.png", **{c: f"{c} {i}" for c in names}} for i in range(n)]
    folder.mkdir()
    path = folder / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("pins")
    three = open_source(_write(root / "one", 12, ["short", "long", "medium"]))
    a = _write(root / "a", 8, ["short", "long", "medium"])
    b = _write(root / "b", 8, ["long", "short"])
    official = open_source(_write(root / "off", 10, ["shortSV_captions", "longSV_captions"]))
    return {"three": three, "mix": open_source(f"{a};{b}"), "official": official}


def _draws(source, caption, seed, epoch, batch_size):
    loader = build_loader(source, batch_size=batch_size, with_images=False, seed=seed, epoch=epoch,
                          caption=caption)
    chosen = {k: n for batch in loader for k, n in zip(batch["keys"], batch["caption_names"])}
    return "".join(chosen[k][0] for k in sorted(chosen))


SEEDS_EPOCHS = [(0, 0), (5, 0), (5, 1), (5, 2)]
# caption as given to build_loader (a --caption text, or a list) -> draws at SEEDS_EPOCHS (batch 5).
LOADER_PINS = {
    "long": ["llllllllllll"] * 4,
    "random": ["mmmsmssmmmsm", "mmsmlslmlsss", "mmsmsmlsmlss", "mlmllsmmsmmm"],
    ("long", "short"): ["slllsllsslll", "sllsslssslll", "llllllsllsll", "ssssslssllsl"],
    "short:0.5,long:0.5": ["lllslsslllsl", "llsllsllssll", "llslslsslssl", "lslsssllslll"],
    "short:1,long:3": ["lllslsslllsl", "llsllslllsll", "llslsllsllsl", "lllllsllslll"],
    "short,long,medium": ["mmlslssllmsm", "lmsmmsmmlsmm", "llslslssmlsm", "mslslsmlsmml"],
    "long:2": ["llllllllllll"] * 4,
    "medium:0.2,short:0.3,long:0.5": ["lllmlmmlllml", "llmllsllssll", "llmlslsmlssl", "lslssmllmlll"],
}


@pytest.mark.parametrize("caption", list(LOADER_PINS), ids=str)
def test_each_caption_shape_draws_what_it_drew_before(sources, caption):
    given = list(caption) if isinstance(caption, tuple) else caption
    got = [_draws(sources["three"], given, seed, epoch, 5) for seed, epoch in SEEDS_EPOCHS]
    assert got == LOADER_PINS[caption]
    if isinstance(caption, str):  # the parsed mix draws alike (stage 2 hands the loader a CaptionMix)
        parsed = [_draws(sources["three"], CaptionMix.parse(caption), s, e, 5) for s, e in SEEDS_EPOCHS]
        assert parsed == LOADER_PINS[caption]


# --caption -> (names a sample may draw, config.json's caption_mix) as stage 2 resolved it; 'random'
# with an embedding cache holding ['long', 'short'] (the data's order wins, 'medium' is not cached).
RESOLVED_PINS = {
    "random": (["short", "long"], {"short": 0.5, "long": 0.5}),
    "long": (["long"], {"long": 1.0}),
    "short:1,long:3": (["short", "long"], {"short": 0.25, "long": 0.75}),
    "short,long,medium": (["short", "long", "medium"],
                          {"short": 0.3333333333333333, "long": 0.3333333333333333,
                           "medium": 0.3333333333333333}),
    "long:2": (["long"], {"long": 1.0}),
}


@pytest.mark.parametrize("spec", list(RESOLVED_PINS))
def test_stage2_resolution_and_the_recorded_mix_are_unchanged(sources, spec):
    mix = CaptionMix.parse(spec).resolve(sources["three"].caption_names, also_in=["long", "short"])
    names, recorded = RESOLVED_PINS[spec]
    assert list(mix.names) == names and mix.as_dict() == recorded
    assert mix.text == spec  # config.json's "caption"
    # A saved config.json's caption reads back as the same mix.
    saved = json.loads(json.dumps({"caption": mix.text, "caption_mix": mix.as_dict()}))
    again = CaptionMix.parse(saved["caption"]).resolve(sources["three"].caption_names,
                                                        also_in=["long", "short"])
    assert again == mix and again.as_dict() == saved["caption_mix"]


# --data 'A;B' (two parts, common captions ['short', 'long']): --caption -> (draws at seed 3, epoch 1,
# batch 4, names, caption_mix).
MIXED_SOURCE_PINS = {
    "random": ("llllssslslsllsss", ["short", "long"], {"short": 0.5, "long": 0.5}),
    "short:0.5,long:0.5": ("lllsssllslllllll", ["short", "long"], {"short": 0.5, "long": 0.5}),
    "long": ("llllllllllllllll", ["long"], {"long": 1.0}),
}

# Official keys (shortSV_captions / longSV_captions): --caption -> (draws at seed 2, epoch 0, batch 3,
# names, caption_mix).
OFFICIAL_PINS = {
    "short:0.5,long:0.5": ("lsslllllsl", ["shortSV_captions", "longSV_captions"],
                           {"shortSV_captions": 0.5, "longSV_captions": 0.5}),
    "long": ("llllllllll", ["longSV_captions"], {"longSV_captions": 1.0}),
    "random": ("ssssssssls", ["shortSV_captions", "longSV_captions"],
               {"shortSV_captions": 0.5, "longSV_captions": 0.5}),
}


@pytest.mark.parametrize("which, spec", [("mix", s) for s in MIXED_SOURCE_PINS]
                         + [("official", s) for s in OFFICIAL_PINS])
def test_multi_source_and_official_key_draws_are_unchanged(sources, which, spec):
    source = sources[which]
    draws, names, recorded = (MIXED_SOURCE_PINS if which == "mix" else OFFICIAL_PINS)[spec]
    seed, epoch, batch = (3, 1, 4) if which == "mix" else (2, 0, 3)
    mix = CaptionMix.parse(spec).resolve(source.caption_names)
    assert list(mix.names) == names and mix.as_dict() == recorded
    assert _draws(source, mix, seed, epoch, batch) == draws
