"""Multi-node embed: a rank writing into a folder rank 0 cannot see is refused on every rank, clearly,
before any work (two gloo ranks, each given its own ``--out`` to simulate node-local disks)."""

from __future__ import annotations

from _ranks import run_on_ranks

from llm2clip_fast.train.shared_folder import MARKER_DIR, UnsharedFolderError, check_shared_folder


def test_a_non_shared_output_folder_is_refused_on_every_rank(tmp_path):
    def rank_fn(rank):
        try:
            check_shared_folder(tmp_path / f"node{rank}" / "cache")
        except UnsharedFolderError as exc:
            return str(exc)
        return None

    messages = run_on_ranks(rank_fn, world=2)
    assert all(m is not None for m in messages), messages
    assert "node0/cache is not shared by every rank" in messages[0]
    assert "node1/cache is not shared by every rank" in messages[1]
    assert "cannot see what rank 1 on" in messages[0] and "shared filesystem" in messages[0]


def test_a_shared_output_folder_passes_and_leaves_no_markers(tmp_path):
    out = tmp_path / "cache"
    assert run_on_ranks(lambda rank: check_shared_folder(out), world=2) == [None, None]
    assert not (out / MARKER_DIR).exists() and out.is_dir()


def test_single_process_is_a_no_op(tmp_path):
    check_shared_folder(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_embed_refuses_node_local_out_before_loading_the_llm(tmp_path, monkeypatch):
    from llm2clip_fast.models import llm_encoder
    from llm2clip_fast.train.embed import embed

    def no_llm(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the output folder was checked")

    monkeypatch.setattr(llm_encoder.LLMTextEncoder, "from_pretrained", no_llm)

    def rank_fn(rank):
        try:
            embed(llm="unused", data=str(tmp_path / "unused.jsonl"), out=tmp_path / f"node{rank}",
                  progress=False)
        except UnsharedFolderError as exc:
            return str(exc)
        return None

    messages = run_on_ranks(rank_fn, world=2)
    assert all(m and "is not shared by every rank" in m for m in messages), messages
