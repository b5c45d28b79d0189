"""No secret is written or printed (issue 28, item 5): credentials in shard URLs and ``pipe:`` commands
(URL userinfo, query signatures, ``Authorization`` headers, ``*_TOKEN``/``*_KEY`` values) are masked
in every log line, error and saved file, while the run itself uses them: http(s) userinfo becomes Basic
authentication, a presigned URL's ``?`` query is sent as given (not refused as a glob), and ``--resume``
with a freshly signed URL continues the run."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import logging
import threading
from pathlib import Path

import pytest
from _stage2_runs import N_TRAIN, bag_of_words, final_state, logged_losses, stage2_args, stop_stage2_in_step

from llm2clip_fast.data.demo import write_demo
from llm2clip_fast.data.embedding_cache import build_embedding_cache
from llm2clip_fast.data.sources import open_source
from llm2clip_fast.data.stream_transport import TransportPolicy
from llm2clip_fast.redaction import redact, redact_value, same_when_redacted
from llm2clip_fast.train.__main__ import cli
from llm2clip_fast.train.__main__ import main as train_main

SHARD = 8
USER, PASSWORD = "alice", "pAss-w0rd-SECRET"
SIGNATURES = ("SIG0SECRET0a1b2c3", "SIG1SECRET4d5e6f7")
TOKEN = "tok-SECRET-98765"
SECRETS = (PASSWORD, *SIGNATURES, TOKEN)


# --------------------------------------------------------------------------------------------- redact


@pytest.mark.parametrize(("text", "shown"), [
    ("https://user:pw@host:8443/d/{000..009}.tar", "https://***@host:8443/d/{000..009}.tar"),
    ("https://ghp_tokenAsUser@github.com/x.tar", "https://***@github.com/x.tar"),
    ("https://b.s3.amazonaws.com/d.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1&X-Amz-Date=1"
     "&X-Amz-Security-Token=abc&X-Amz-Signature=f00d",
     "https://b.s3.amazonaws.com/d.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=1"
     "&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://a.blob.core.windows.net/c/d.tar?sv=2022&se=2030&sp=r&sig=a%2Bb",
     "https://a.blob.core.windows.net/c/d.tar?sv=2022&se=2030&sp=r&sig=***"),
    ("https://h/d.tar?token=abc&page=2", "https://h/d.tar?token=***&page=2"),
    ("pipe:curl -fsS -H 'Authorization: Bearer abc.def' https://h/x.tar",
     "pipe:curl -fsS -H 'Authorization: Bearer ***' https://h/x.tar"),
    ('pipe:curl -H "X-Api-Key: k123" -H "Private-Token: p9" https://h/x.tar',
     'pipe:curl -H "X-Api-Key: ***" -H "Private-Token: ***" https://h/x.tar'),
    ("pipe:curl -u bob:hunter2 https://h/x.tar", "pipe:curl -u *** https://h/x.tar"),
    ("pipe:wget --password=hunter2 -O - https://h/x.tar", "pipe:wget --password=*** -O - https://h/x.tar"),
    ("pipe:env HF_TOKEN=hf_abc AWS_SECRET_ACCESS_KEY=xyz aws s3 cp s3://b/x.tar -",
     "pipe:env HF_TOKEN=*** AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/x.tar -"),
    # Nothing to hide: unchanged (sample keys and reasons that merely mention such words included).
    ("/data/cc/{000000..000009}.tar", "/data/cc/{000000..000009}.tar"),
    ("s3://bucket/d-{0..9}.tar", "s3://bucket/d-{0..9}.tar"),
    ("bad keys: author-7: image missing; tokenizer: json member cannot be parsed",
     "bad keys: author-7: image missing; tokenizer: json member cannot be parsed"),
])
def test_redact_masks_credentials_and_nothing_else(text, shown):
    assert redact(text) == shown
    assert redact(shown) == shown  # idempotent: a saved value compares with the redacted live one


def test_redacted_values_compare_equal_across_fresh_signatures():
    a = {"data": "https://h/d.tar?X-Amz-Signature=one", "list": ["pipe:env API_TOKEN=1 cat x"], "n": 3}
    b = {"data": "https://h/d.tar?X-Amz-Signature=two", "list": ["pipe:env API_TOKEN=2 cat x"], "n": 3}
    assert same_when_redacted(a, b) and redact_value(a)["n"] == 3
    assert not same_when_redacted(a, {**b, "data": "https://h/other.tar?X-Amz-Signature=two"})


# ------------------------------------------------------------------------------------- the transport


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    """Serves the shard folder to Basic-authenticated requests only; records path, query and auth."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        path, _, query = self.path.partition("?")
        server.requests.append((path.lstrip("/"), query, self.headers.get("Authorization")))
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if self.headers.get("Authorization") != expected:
                self.send_error(401)
                return
            file = server.root / path.lstrip("/")
            if not file.is_file() or path.lstrip("/") in server.missing:
                self.send_error(404)
                return
            body = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("redaction")
    spec = write_demo(root / "data", n_train=N_TRAIN, n_val=0, n_long_detail_groups=0, image_size=32,
                      format="wds", shard_size=SHARD)["train"]
    source = open_source(spec)
    build_embedding_cache(source.iter_captions(), bag_of_words, root / "cache",
                          caption_names=source.caption_names, dim=24,
                          metadata={"path": "bag-of-words", "pooling": "mean"})
    return {"folder": Path(spec).parent, "pattern": Path(spec).name, "cache": root / "cache"}


@pytest.fixture
def server(shards):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthHandler)
    httpd.daemon_threads = True
    httpd.root, httpd.requests, httpd.missing = shards["folder"], [], set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://{USER}:{PASSWORD}@127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_userinfo_is_sent_as_basic_auth_and_never_shown(shards, server, caplog):
    server.missing.add("shard-000001.tar")
    spec = server.base + shards["pattern"]
    with caplog.at_level(logging.WARNING):
        source = open_source(spec, transport=TransportPolicy(timeout=5, retries=1, backoff=0.0))
        keys = source.keys()
    assert len(keys) == N_TRAIN - SHARD  # every shard but the missing one, read with the credentials
    assert all(auth and auth.startswith("Basic ") for _, _, auth in server.requests)
    assert "HTTP Error 404" in caplog.text and f"{USER}:" not in caplog.text and PASSWORD not in caplog.text
    assert PASSWORD not in source.describe() and "http://***@127.0.0.1" in source.describe()


def test_a_presigned_url_with_a_query_is_accepted_and_its_query_sent(shards, server):
    spec = server.base + shards["pattern"] + f"?X-Amz-Expires=60&X-Amz-Signature={SIGNATURES[0]}"
    source = open_source(spec, transport=TransportPolicy(timeout=5, retries=0))
    assert len(source.keys()) == N_TRAIN
    queries = {query for name, query, _ in server.requests if name.startswith("shard-")}
    assert queries == {f"X-Amz-Expires=60&X-Amz-Signature={SIGNATURES[0]}"}
    with pytest.raises(ValueError, match="glob patterns cannot be listed"):
        open_source(server.base + "shard-*.tar?X-Amz-Signature=x")


# ------------------------------------------------------------------------------------- a whole run


def _everything_written(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*")) if p.is_file())


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} in {where}"


def test_stage2_on_secret_urls_writes_and_prints_no_secret_and_resumes_with_a_new_signature(
        shards, server, tmp_path, capsys, caplog, monkeypatch):
    server.missing.add("shard-000002.tar")  # lost: its URL goes into the bad-data notes

    def spec(signature):
        return server.base + shards["pattern"] + f"?X-Amz-Expires=60&X-Amz-Signature={signature}"

    demo = {"data": spec(SIGNATURES[0]), "cache": shards["cache"]}
    args = ("--save-every", "1", "--max-bad-fraction", "0.5", "--stream-retries", "0")
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        stop_stage2_in_step(monkeypatch, stage2_args(demo, out, *args, steps=3), 3)
        # A presigned URL expires: the resumed run is given a freshly signed one, same data.
        resumed = {**demo, "data": spec(SIGNATURES[1])}
        assert cli(stage2_args(resumed, out, *args, "--resume", steps=3)) == 0
    printed = capsys.readouterr()
    _assert_no_secret(printed.out + printed.err, "the printed output")
    _assert_no_secret(caplog.text, "the log records")
    written = _everything_written(out)
    _assert_no_secret(written, f"the files of {out}")
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == redact(spec("x")) and "X-Amz-Signature=***" in config["data"]
    summary = json.loads((out / "summary.json").read_text())
    assert any("shard-000002.tar" in note for note in summary["bad_data"]["notes"])
    assert summary["steps"] == 3

    # The same run uninterrupted gives the same losses and weights: the resume continued it exactly.
    server.missing.add("shard-000002.tar")
    assert train_main(stage2_args(demo, tmp_path / "full", *args, steps=3)) == 0
    assert logged_losses(out) == logged_losses(tmp_path / "full")
    a, b = final_state(out), final_state(tmp_path / "full")
    assert all(a[k].equal(b[k]) for k in a)

    # Other data is still refused, and the message shows no secret either.
    (out / "model").rename(tmp_path / "model-before")
    other = {**demo, "data": server.base + "shard-{000000..000004}.tar?X-Amz-Signature=" + SIGNATURES[1]}
    with pytest.raises(ValueError, match="these options differ") as refused:
        train_main(stage2_args(other, out, *args, "--resume", steps=3))
    assert "shard-{000000..000004}.tar?X-Amz-Signature=***" in str(refused.value)
    _assert_no_secret(str(refused.value), "the error")


def test_an_authorization_header_and_a_token_in_a_pipe_command_are_never_written(shards, tmp_path, capsys,
                                                                                  caplog):
    folder = shards["folder"]
    command = (f"pipe:env DATA_API_TOKEN={TOKEN} sh -c 'cat \"$1\"' _ {folder}/{shards['pattern']} "
               f"'Authorization: Bearer {SIGNATURES[0]}'")
    demo = {"data": command, "cache": shards["cache"]}
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        assert cli(stage2_args(demo, out, "--save-every", "1", steps=2)) == 0
    printed = capsys.readouterr()
    _assert_no_secret(printed.out + printed.err + caplog.text, "the output")
    _assert_no_secret(_everything_written(out), f"the files of {out}")
    assert "DATA_API_TOKEN=***" in json.loads((out / "config.json").read_text())["data"]
    # A failing command's message (it quotes the command) is redacted too.
    broken = {**demo, "data": command.replace("cat", "false")}
    assert cli(stage2_args(broken, tmp_path / "broken", "--stream-retries", "0")) != 0
    printed = capsys.readouterr()
    assert "exited with status" in printed.err or "no sample could be read" in printed.err
    _assert_no_secret(printed.err, "the error line")

