"""Streamed WebDataset shards: http (a server started here on 127.0.0.1), ``pipe:cat``, fsspec.

Checked: streamed batches match a local run (the same samples once per epoch with the same per-sample
crops and captions as the random-access loader, and batch for batch the same as the local tars read as
a stream); a run killed with SIGKILL mid-epoch resumes from its saved loader state to exactly the
uninterrupted batches, seeking over http (Range) and re-reading where the transport cannot seek
(``pipe:``); transport faults (404, connection reset, truncated body, a stalled server or command) are
retried, and a shard that keeps failing is counted as bad data naming the shard, within the timeout.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip_fast.data import BadDataError, build_loader, open_source
from llm2clip_fast.data.stream_transport import ShardStream, TransportError, TransportPolicy

REPO = Path(__file__).resolve().parents[2]
SIZES = [5, 4, 6, 5, 3, 5]  # uneven shards, 28 samples
N = sum(SIZES)
NAMES = [f"d-{i:03d}.tar" for i in range(len(SIZES))]
BRACE = "d-{000..005}.tar"
FAST = TransportPolicy(timeout=2.0, retries=2, backoff=0.0)


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (7, 5), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(out, "PNG")
    return out.getvalue()


def _write_shards(folder: Path) -> None:
    n = 0
    for name, size in zip(NAMES, SIZES):
        with tarfile.open(folder / name, "w") as tar:
            for i in range(n, n + size):
                meta = {"short": f"short {i}", "long": f"a long caption {i}", "label": f"c{i % 3}"}
                members = ((f"k{i:03d}.png", _png(i)), (f"k{i:03d}.json", json.dumps(meta).encode()))
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        n += size


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the shard folder; honours Range when the server allows it; injects faults per file:
    ``server.faults[name]`` is a list consumed one per request, or a string applied to every request."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        name = self.path.lstrip("/")
        server.requests.append((name, self.headers.get("Range")))
        faults = server.faults.get(name)
        fault = faults if isinstance(faults, str) else (faults.pop(0) if faults else None)
        path = server.root / name
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if fault == "stall":
                time.sleep(server.stall)
            if fault == "404" or not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            wanted = self.headers.get("Range")
            if wanted and server.ranges:
                start = int(wanted.split("=")[1].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault == "reset":  # a third of the promised body, then the connection drops
                self.wfile.write(body[: len(body) // 3])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stream_shards")
    _write_shards(folder)
    return folder


@pytest.fixture
def server(shards):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.root, httpd.faults, httpd.requests, httpd.ranges, httpd.stall = shards, {}, [], False, 3.0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _loader(spec_or_source, num_workers=0, **kwargs):
    source = spec_or_source if not isinstance(spec_or_source, str) else open_source(spec_or_source,
                                                                                      transport=FAST)
    args = dict(batch_size=3, image_size=8, num_workers=num_workers, seed=3, epoch=1, shuffle_buffer=4)
    return build_loader(source, **{**args, **kwargs})


def _rows(loader) -> list[tuple]:
    return [(b["batch_index"], b["keys"], b["captions"], b["labels"], b["pixel_values"]) for b in loader]


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(x[:4] == y[:4] and torch.equal(x[4], y[4]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def local_stream(shards):
    """The local tars read as a stream: the reference every transport must reproduce."""
    source = open_source(str(shards / BRACE), streaming=True)
    return {w: _rows(_loader(source, num_workers=w)) for w in (0, 2)}


def test_remote_specs_open_as_streams_and_local_tars_keep_random_access(shards, server):
    local = open_source(str(shards / BRACE))
    assert not getattr(local, "streaming", False)  # today's random-access path, unchanged
    streamed = open_source(server.url + BRACE, transport=FAST)
    piped = open_source(f"pipe:cat {shards}/{BRACE}", transport=FAST)
    for source in (streamed, piped):
        assert source.streaming and len(source.shards) == len(SIZES)
        assert source.caption_names == local.caption_names and source.label_column == "label"
        assert source.keys() == local.keys()
        assert list(source.iter_captions()) == list(local.iter_captions())
        assert source.shard_sizes == SIZES and len(source) == N
    with pytest.raises(TypeError, match="read in order only"):
        streamed.key_at(0)


def test_streamed_batches_match_the_local_run(shards, server, local_stream):
    random_access = _rows(_loader(open_source(str(shards / BRACE))))
    per_key = {k: (c, lab, p) for _, keys, caps, labs, pix in random_access
               for k, c, lab, p in zip(keys, caps, labs, pix)}
    for workers, reference in local_stream.items():
        # Every sample once per epoch, with the crop and caption the random-access loader gives it
        # (both are seeded by (seed, epoch, key), not by where the sample lands).
        keys = [k for _, ks, *_ in reference for k in ks]
        assert sorted(keys) == sorted(per_key) and len(keys) == N
        for _, ks, caps, labs, pix in reference:
            for k, c, lab, p in zip(ks, caps, labs, pix):
                assert (c, lab) == per_key[k][:2] and torch.equal(p, per_key[k][2])
        assert [r[0] for r in reference] == list(range(len(reference)))
        assert _same(_rows(_loader(server.url + BRACE, num_workers=workers)), reference)
        assert _same(_rows(_loader(f"pipe:cat {shards}/{BRACE}", num_workers=workers)), reference)
    # Another epoch: another shard order and shuffle, the same samples.
    other = _rows(_loader(open_source(str(shards / BRACE), streaming=True), epoch=2))
    assert [r[1] for r in other] != [r[1] for r in local_stream[0]]
    assert sorted(k for r in other for k in r[1]) == sorted(per_key)


def _kill_child(spec: str, state_file: Path, cut: int) -> None:
    """Run a 2-worker streamed loader in a child that saves its loader state after every batch; SIGKILL
    the child (and its workers) once ``cut`` batches were saved."""
    code = (
        "import json, os, sys, time\n"
        "from llm2clip_fast.data import build_loader, open_source\n"
        "from llm2clip_fast.data.stream_transport import TransportPolicy\n"
        "source = open_source(sys.argv[1], transport=TransportPolicy(timeout=2.0, retries=2, backoff=0.0))\n"
        "loader = build_loader(source, batch_size=3, image_size=8, num_workers=2, seed=3, epoch=1,\n"
        "                      shuffle_buffer=4)\n"
        "rows = []\n"
        "for b in loader:\n"
        "    rows.append([b['batch_index'], b['keys'], b['captions']])\n"
        "    tmp = sys.argv[2] + '.tmp'\n"
        "    with open(tmp, 'w') as f:\n"
        "        json.dump({'rows': rows, 'state': loader.state_dict()}, f)\n"
        "    os.replace(tmp, sys.argv[2])\n"
        f"    if len(rows) == {cut}:\n"
        "        time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", code, spec, str(state_file)], env=env,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if state_file.exists() and len(json.loads(state_file.read_text())["rows"]) == cut:
                break
            time.sleep(0.1)
        assert child.poll() is None, f"the child exited early with status {child.returncode}"
        assert state_file.exists() and len(json.loads(state_file.read_text())["rows"]) == cut
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def test_each_epoch_reshuffles_inside_a_shard_not_only_the_shard_order(shards):
    """One shard: the shard order cannot change between epochs, so only each worker's shuffle buffer,
    seeded with the epoch, reorders its samples. The same epoch twice is the same order."""
    source = open_source(str(shards / "d-002.tar"), streaming=True)

    def order(epoch: int) -> tuple[str, ...]:
        return tuple(k for b in _loader(source, epoch=epoch, batch_size=2, shuffle_buffer=SIZES[2])
                     for k in b["keys"])

    orders = [order(e) for e in (1, 2, 3)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders) and len(orders[0]) == SIZES[2]
    assert len(set(orders)) == 3, orders
    assert order(2) == orders[1]


@pytest.mark.parametrize("transport", ["http-range", "pipe"])
def test_killed_run_resumes_to_the_uninterrupted_batches(shards, server, local_stream, tmp_path, transport):
    server.ranges = transport == "http-range"
    spec = server.url + BRACE if transport == "http-range" else f"pipe:cat {shards}/{BRACE}"
    reference = local_stream[2]
    cut = 5  # batches 0..4 seen; both workers are mid-shard and mid-block
    _kill_child(spec, tmp_path / "state.json", cut)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["rows"] == [[i, ks, cs] for i, ks, cs, *_ in reference[:cut]]
    positions = saved["state"]["stream"]["positions"]
    assert {int(w) for w in positions} == {0, 1} and any(p["sample"] > 0 for p in positions.values())

    server.requests.clear()
    resumed = _loader(spec, num_workers=2)
    resumed.load_state_dict(saved["state"])
    assert _same(_rows(resumed), reference[cut:])
    assert resumed.state_dict()["start_batch"] == len(reference)
    if transport == "http-range":  # the resumed shards were opened at their saved byte offsets
        offsets = [int(r.split("=")[1].split("-")[0]) for _, r in server.requests if r]
        assert len(offsets) == 2 and all(o > 0 for o in offsets)


@pytest.mark.parametrize("transport", ["http", "http-range", "pipe"])
def test_resume_seeks_where_it_can_and_says_when_it_rereads(shards, server, local_stream, caplog, transport):
    server.ranges = transport == "http-range"
    spec = f"pipe:cat {shards}/{BRACE}" if transport == "pipe" else server.url + BRACE
    reference = local_stream[0]
    first = _loader(spec)
    it = iter(first)
    assert _same(_rows([next(it) for _ in range(4)]), reference[:4])
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores survives JSON
    del it
    with pytest.raises(ValueError, match="num_workers was 1, is 2"):
        _loader(spec, num_workers=2).load_state_dict(state)
    resumed = _loader(spec)
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.data.stream"):
        assert _same(_rows(resumed), reference[4:])
    if transport == "http-range":
        assert "cannot seek" not in caplog.text
    else:
        assert "cannot seek; re-read and discarded" in caplog.text


def test_start_batch_without_positions_rereads_and_discards(shards, local_stream, caplog):
    spec = f"pipe:cat {shards}/{BRACE}"
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.data.stream"):
        got = _rows(_loader(spec, num_workers=2, start_batch=4))
    assert _same(got, local_stream[2][4:])
    assert "without saved stream positions" in caplog.text


def test_transient_faults_are_retried(server, local_stream, caplog):
    server.ranges = True
    source = open_source(server.url + BRACE, transport=TransportPolicy(timeout=0.5, retries=3, backoff=0.0))
    server.faults.update({"d-001.tar": ["404"], "d-002.tar": ["reset", "reset"], "d-004.tar": ["stall"]})
    server.stall = 1.5
    loader = _loader(source)
    with caplog.at_level(logging.WARNING, logger="llm2clip_fast.data.stream"):
        assert _same(_rows(loader), local_stream[0])
    assert loader.bad_data.bad == 0 and loader.bad_data.seen == N
    for name, error in (("d-001", "HTTPError: HTTP Error 404"), ("d-002", "IncompleteRead"),
                        ("d-004", "TimeoutError")):
        assert f"{name}.tar: {error}" in caplog.text
    # A reset body resumes with a Range request at the byte reached.
    assert any(n == "d-002.tar" and r for n, r in server.requests)


def _samples_begun_before(path: Path, fault: str) -> int:
    """How many samples of a shard a reader begins before the fault: none for a 404; for a reset (the
    server sends a third of the body), those whose first member's header arrived whole."""
    if fault == "404":
        return 0
    cut = path.stat().st_size // 3
    with tarfile.open(path) as tar:
        return len({m.name.split(".")[0] for m in tar.getmembers() if m.offset + 512 <= cut})


@pytest.mark.parametrize("fault", ["404", "reset"])
def test_a_shard_that_keeps_failing_is_bad_data_naming_it(server, fault):
    source = open_source(server.url + BRACE, transport=TransportPolicy(timeout=0.5, retries=2, backoff=0.0))
    assert len(source) == N  # sizes learned before the shard breaks
    server.faults["d-003.tar"] = fault
    with pytest.raises(BadDataError, match=r"d-003\.tar.*gave up after 2 retries"):
        list(_loader(source))
    loader = _loader(source, bad_data=1.0)
    keys = [k for b in loader for k in b["keys"]]
    first = sum(SIZES[:3])
    others = {f"k{i:03d}" for i in range(N) if not first <= i < first + SIZES[3]}
    assert others <= set(keys) and len(keys) == len(set(keys))
    # What the shard gave before the break is kept (404: nothing); the rest counts as lost.
    tracker = loader.bad_data
    assert tracker.lost >= 1 and len(keys) + len(tracker.bad_keys) + tracker.lost == N
    assert tracker.lost == SIZES[3] - _samples_begun_before(server.root / "d-003.tar", fault)
    assert any("d-003.tar" in note and "gave up" in note for note in tracker.notes)


def test_losses_are_counted_once_across_a_resume(server):
    policy = TransportPolicy(timeout=0.5, retries=1, backoff=0.0)
    # d-002 is read second in epoch 1 and breaks after its 4th sample: inside the second shuffle block, so
    # a resume inside that block reads the break again (its loss must not count twice).
    server.faults["d-002.tar"] = "reset"
    source = open_source(server.url + BRACE, transport=policy)
    full = _loader(source, bad_data=1.0, shuffle_buffer=5)
    rows = _rows(full)
    assert full.bad_data.lost >= 1
    for cut in range(1, len(rows)):
        first = _loader(source, bad_data=1.0, shuffle_buffer=5)
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state_dict()
        del it
        resumed = _loader(source, bad_data=1.0, shuffle_buffer=5)
        resumed.load_state_dict(state)
        assert _same(_rows(resumed), rows[cut:]), cut
        assert resumed.bad_data.as_dict() == full.bad_data.as_dict(), cut


def test_a_truncated_shard_keeps_its_first_samples(tmp_path, shards):
    for name in NAMES:
        (tmp_path / name).write_bytes((shards / name).read_bytes())
    cut = (tmp_path / "d-002.tar").read_bytes()
    (tmp_path / "d-002.tar").write_bytes(cut[: len(cut) // 2 + 100])
    source = open_source(f"pipe:cat {tmp_path}/{BRACE}", transport=FAST)
    assert 0 < source.shard_sizes[2] < SIZES[2]
    loader = _loader(source, bad_data=1.0, train=False)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) and loader.bad_data.bad >= SIZES[2] - source.shard_sizes[2]
    assert any("d-002.tar" in note and "truncated" in note for note in loader.bad_data.notes)


def test_stalled_transports_time_out_instead_of_hanging(server):
    server.faults["d-000.tar"], server.stall = "stall", 3.0
    started = time.monotonic()
    with pytest.raises(TransportError, match="gave up after 1 retries"):
        ShardStream(server.url + "d-000.tar", policy=TransportPolicy(timeout=0.3, retries=1, backoff=0.0))
    started_pipe = time.monotonic()
    with pytest.raises(TransportError, match=r"no data from the command within 0\.3s"):
        with ShardStream("pipe:sleep 30", policy=TransportPolicy(timeout=0.3, retries=1, backoff=0.0)) as s:
            s.read(10)
    assert time.monotonic() - started_pipe < 5 and time.monotonic() - started < 10
    with pytest.raises(TransportError, match="exited with status 1"):
        ShardStream("pipe:cat /nonexistent/x.tar", policy=FAST).read(10)


def test_sizes_json_beside_the_shards_spares_the_counting_pass(tmp_path, shards, server):
    for name in NAMES:
        (tmp_path / name).write_bytes((shards / name).read_bytes())
    # Deliberately not the true counts: proof they were taken from the file, not counted.
    claimed = {name: size + 1 for name, size in zip(NAMES, SIZES)}
    (tmp_path / "sizes.json").write_text(json.dumps(claimed))
    assert open_source(str(tmp_path / BRACE), streaming=True).shard_sizes == list(claimed.values())
    (tmp_path / "sizes.json").write_text(json.dumps({NAMES[0]: 5}))  # incomplete: counted instead
    assert open_source(str(tmp_path / BRACE), streaming=True).shard_sizes == SIZES
    server.root = tmp_path
    (tmp_path / "sizes.json").write_text(json.dumps(dict(zip(NAMES, SIZES))))
    source = open_source(server.url + BRACE, transport=FAST)
    server.requests.clear()
    assert len(source) == N and [n for n, _ in server.requests] == ["sizes.json"]


def test_ranks_and_workers_split_whole_shards(shards):
    source = open_source(str(shards / BRACE), streaming=True)
    seen = []
    for rank in range(2):
        loader = _loader(source, num_workers=2, rank=rank, world_size=2)
        seen += [k for b in loader for k in b["keys"]]
    assert sorted(seen) == sorted(source.keys())  # every sample once per epoch over ranks x workers
    counts = {r: len(list(_loader(source, rank=r, world_size=2, drop_last=True))) for r in range(2)}
    assert counts[0] == counts[1] == _loader(source, rank=0, world_size=2, drop_last=True).num_batches()
    with pytest.raises(ValueError, match="cannot feed world_size=7"):
        _loader(source, rank=0, world_size=7)


def test_fsspec_urls_and_missing_backends(shards):
    fsspec = pytest.importorskip("fsspec")
    for name in NAMES:
        with fsspec.open(f"memory://stream-test/{name}", "wb") as f:
            f.write((shards / name).read_bytes())
    source = open_source("memory://stream-test/" + BRACE, transport=FAST)
    assert source.keys() == open_source(str(shards / BRACE)).keys()
    stream = ShardStream("memory://stream-test/d-001.tar", start=512, policy=FAST)
    assert stream.read(10) == (shards / "d-001.tar").read_bytes()[512:522] and stream.discarded == 0
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install s3fs"):
            open_source("s3://bucket/" + BRACE)


def test_spec_errors_name_the_problem(shards):
    with pytest.raises(ValueError, match="glob patterns cannot be listed over a stream"):
        open_source("http://127.0.0.1:9/d-*.tar")
    with pytest.raises(ValueError, match="streaming=False but the spec names remote shards"):
        open_source("pipe:cat x.tar", streaming=False)
