"""A shard that is lost whole counts as the samples it should hold, not as one sample (issue 28, item 1).

For every failure kind (a body that is not a tar, a ``pipe:`` command that exits non-zero, a stream
without the tar end-of-archive blocks, a local tar cut exactly between two members), streamed and local,
the samples lost are what the shard should hold (its ``sizes.json`` count, else the median count of the
intact shards) minus what was read; so the 1 % rule stops a run that never saw a sixth of its data.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llm2clip_fast.data import BadDataError, build_loader, open_source
from llm2clip_fast.data.bad_data import BadDataTracker
from llm2clip_fast.data.stream_transport import TransportPolicy

PER_SHARD = 6
N_SHARDS = 5
NAMES = [f"d-{i:03d}.tar" for i in range(N_SHARDS)]
FAST = TransportPolicy(timeout=2.0, retries=1, backoff=0.0)


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6, 5), ((41 * i) % 256, (83 * i) % 256, (17 * i) % 256)).save(out, "PNG")
    return out.getvalue()


def _shard_bytes(first: int, count: int) -> tuple[bytes, list[int]]:
    """A tar of ``count`` samples from key ``first``, and the byte offset of each sample's first header."""
    buf = io.BytesIO()
    starts = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(first, first + count):
            starts.append(buf.tell())
            meta = {"short": f"short {i}", "long": f"a long caption {i}"}
            for member, data in ((f"k{i:03d}.png", _png(i)), (f"k{i:03d}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), starts


@pytest.fixture
def shards(tmp_path) -> Path:
    for s, name in enumerate(NAMES):
        (tmp_path / name).write_bytes(_shard_bytes(s * PER_SHARD, PER_SHARD)[0])
    return tmp_path


def _cut_between_members(path: Path, keep: int) -> None:
    """What a killed writer leaves: the first ``keep`` samples, whole, and nothing after them."""
    first = int(path.stem.split("-")[1]) * PER_SHARD
    data, starts = _shard_bytes(first, PER_SHARD)
    path.write_bytes(data[: starts[keep]])


def _drain(source, bad_data=1.0):
    loader = build_loader(source, batch_size=2, image_size=8, caption="short", train=False, bad_data=bad_data,
                          num_workers=0)
    keys = [k for batch in loader for k in batch["keys"]]
    return loader.bad_data, keys


def _pipe_spec(folder: Path, names=NAMES) -> list[str]:
    return [f"pipe:cat {folder / name}" for name in names]


# ------------------------------------------------------------------------------ streamed, counting pass


@pytest.mark.parametrize("kind", ["garbage", "command fails", "empty body"])
def test_a_streamed_shard_lost_whole_counts_the_median_shard(shards, kind):
    spec = _pipe_spec(shards)
    if kind == "garbage":
        (shards / NAMES[2]).write_bytes(bytes(range(256)) * 40)
    elif kind == "command fails":
        spec[2] = f"pipe:cat {shards / 'missing.tar'}"  # cat exits 1: a 404 through `curl -f` does the same
    else:
        (shards / NAMES[2]).write_bytes(b"")
    source = open_source(spec, transport=FAST)
    assert len(source) == PER_SHARD * (N_SHARDS - 1)  # the counting pass read nothing of shard 2
    tracker, keys = _drain(source)
    assert len(keys) == PER_SHARD * (N_SHARDS - 1)
    assert tracker.lost == PER_SHARD  # a whole shard, not one sample
    assert tracker.seen == PER_SHARD * N_SHARDS and tracker.bad == PER_SHARD
    with pytest.raises(BadDataError, match=rf"{PER_SHARD} of {PER_SHARD * N_SHARDS} samples were bad"):
        _drain(source, bad_data=0.01)


def test_a_stream_cut_between_members_counts_what_the_shard_should_hold(shards):
    _cut_between_members(shards / NAMES[3], keep=2)
    source = open_source(_pipe_spec(shards), transport=FAST)
    assert source.shard_sizes[3] == 2
    tracker, keys = _drain(source)
    assert len(keys) == PER_SHARD * (N_SHARDS - 1) + 2 and tracker.lost == PER_SHARD - 2
    assert any(NAMES[3] in note and "end-of-archive" in note for note in tracker.notes)


def test_sizes_json_says_what_a_streamed_shard_should_hold(shards):
    # Shards of different sizes: no median to go by, the published count is what the shard held.
    (shards / NAMES[4]).write_bytes(_shard_bytes(4 * PER_SHARD, 10)[0])
    (shards / "sizes.json").write_text(json.dumps({**{n: PER_SHARD for n in NAMES[:4]}, NAMES[4]: 10}))
    _cut_between_members(shards / NAMES[4], keep=1)
    source = open_source(str(shards / "d-{000..004}.tar"), streaming=True, transport=FAST)
    assert source.shard_sizes[4] == 10  # from sizes.json, not counted
    tracker, _ = _drain(source)
    assert tracker.lost == 9


def test_a_full_pass_before_the_sizes_are_known_counts_against_the_intact_shards(shards):
    """``iter_captions`` (what embed reads) is itself the counting pass: a shard that broke is counted
    against the median of the shards read intact in the same pass."""
    spec = _pipe_spec(shards)
    spec[0] = "pipe:exit 3"  # the first shard: nothing was read before it to compare with
    source = open_source(spec, transport=FAST)
    tracker = BadDataTracker(1.0)
    keys = [k for k, _ in source.iter_captions(bad_data=tracker)]
    assert len(keys) == PER_SHARD * (N_SHARDS - 1) and tracker.lost == PER_SHARD
    assert source.shard_sizes == [0] + [PER_SHARD] * (N_SHARDS - 1)  # the pass was the counting pass
    strict = BadDataTracker(0.01)
    list(open_source(spec, transport=FAST).iter_captions(bad_data=strict))
    with pytest.raises(BadDataError, match=rf"{PER_SHARD} of {PER_SHARD * N_SHARDS} samples were bad"):
        strict.check_end_of_epoch()  # what embed does when its pass ends


# ---------------------------------------------------------------------------------------------- local


def test_a_local_tar_cut_between_members_is_noticed_and_counted(shards):
    _cut_between_members(shards / NAMES[1], keep=2)
    with pytest.warns(UserWarning, match="end-of-archive"):
        source = open_source(str(shards / "d-{000..004}.tar"))
        assert len(source) == PER_SHARD * (N_SHARDS - 1) + 2
    assert source.lost_samples == {str(shards / NAMES[1]): PER_SHARD - 2}
    tracker, keys = _drain(source)
    assert len(keys) == PER_SHARD * (N_SHARDS - 1) + 2 and tracker.lost == PER_SHARD - 2
    with pytest.raises(BadDataError, match=r"\(4 lost in damaged shards\)"):
        _drain(source, bad_data=0.01)


def test_a_local_tar_checks_its_count_against_sizes_json(shards):
    (shards / NAMES[0]).write_bytes(_shard_bytes(0, 10)[0])  # shards of unequal sizes
    (shards / "sizes.json").write_text(json.dumps({**{n: PER_SHARD for n in NAMES}, NAMES[0]: 10}))
    _cut_between_members(shards / NAMES[0], keep=3)
    with pytest.warns(UserWarning, match="end-of-archive"):
        source = open_source(str(shards / "d-*.tar"))
        len(source)
    assert source.lost_samples == {str(shards / NAMES[0]): 7}  # sizes.json's 10, not the median 6
    # A shard that closes properly but holds fewer samples than sizes.json lists lost the others.
    (shards / NAMES[0]).write_bytes(_shard_bytes(0, 4)[0])
    with pytest.warns(UserWarning, match="holds 4 samples where its sizes.json lists 10"):
        source = open_source(str(shards / "d-*.tar"))
        len(source)
    assert source.lost_samples == {str(shards / NAMES[0]): 6}


def test_a_local_shard_with_a_damaged_header_is_noticed(shards):
    data, starts = _shard_bytes(2 * PER_SHARD, PER_SHARD)
    broken = bytearray(data)
    broken[starts[4]: starts[4] + 100] = b"\x01" * 100  # garbage where sample 4's header starts
    (shards / NAMES[2]).write_bytes(bytes(broken))
    with pytest.warns(UserWarning, match="truncated or damaged after 4 samples"):
        source = open_source(str(shards / "d-{000..004}.tar"))
        len(source)
    assert source.lost_samples == {str(shards / NAMES[2]): 2}



def test_embed_counts_a_local_shard_lost_whole(shards):
    """embed's caption pass counts what truncated local shards lost (it used to read the losses before
    the shards were indexed, so it counted none)."""
    from llm2clip_fast.train.embed import _caption_records

    _cut_between_members(shards / NAMES[4], keep=1)
    with pytest.warns(UserWarning, match="end-of-archive"):
        source = open_source(str(shards / "d-{000..004}.tar"), require_images=False)
        tracker = BadDataTracker(0.01)
        with pytest.raises(BadDataError, match=r"\(5 lost in damaged shards\)"):
            list(_caption_records(source, ["short"], tracker))
