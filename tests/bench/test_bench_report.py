"""bench/report.py on small hand-made bench JSON (tests/fixtures/bench, shaped like the scripts' output)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from bench import report

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bench"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == report.PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR chunk first"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    path = report.build_report([FIXTURES], out, plot_note="measured under load")
    return out, path.read_text()


def test_every_section_is_reported(built):
    _, text = built
    for heading in (
        "## CLIP loss",
        "## SigLIP loss",
        "## Global-batch loss: memory per rank",
        "## Text adapter",
        "## Caption embedding",
        "## Stage-1 training step",
        "## Stage-2 training step",
        "## Other bench results",
        "## GPU check",
    ):
        assert heading in text, heading
    assert "Not found" not in text
    # The machine and the date of the measurement are named.
    assert "AMD EPYC" in text and "avx512_bf16" in text and "2026-11-29" in text
    assert "> measured under load" in text


def test_plots_exist_are_pngs_and_are_linked(built):
    out, text = built
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    for expected in (
        "loss_throughput_cpu_fp32_D64_time_memory.png",
        "loss_throughput_cpu_fp32_D64_tflops.png",
        "loss_throughput_siglip_cpu_fp32_D64_time_memory.png",
        "loss_throughput_siglip_cpu_fp32_D64_tflops.png",
        "distributed_memory_D64.png",
        "adapter_throughput_cpu_fp32.png",
        "embed_throughput_cpu.png",
        "train_throughput_stage1_cpu.png",
        "stage2_throughput_cpu.png",
    ):
        assert expected in names, expected
    for png in pngs:
        width, height = _png_size(png)
        assert width >= 400 and height >= 300, (png, width, height)
        assert png.stat().st_size < 150_000, png
        assert f"]({png.name})" in text, f"{png.name} is not linked from report.md"


def test_numbers_ratios_and_failures(built):
    _, text = built
    # Fused vs materialised at B=1024 in the CLIP fixture: 0.9*16 / (1.0*16) ms, 30 vs 4 MiB.
    assert "B=1024: materialised/fused time 0.9×, peak memory 7.5×" in text
    # A failed point is in the table and its error under it.
    assert "| materialised | – | – | 4096 | 64 | fp32 | OOM |" in text
    assert "killed (SIGKILL, likely the OOM killer)" in text
    assert "InductorError: boom" in text
    # The distributed summary and the worst rank of the second file (one rank timed out).
    assert "| clip | 1024 | 64 | 2 | 3.5 | 11.8 | 0.297 | 0.1 |" in text
    assert "| openclip-clip | 2 | 2048 | 64 | timeout |" in text
    # Unknown benches are tabled, gpu_check's summary is verbatim and its stage files listed.
    assert "| mmap | warm | 4096 | 9,500,000 |" in text
    assert (FIXTURES / "gpu_check" / "summary.md").read_text().strip() in text  # no headings: verbatim
    assert "`correctness.json`: stage correctness, status skipped" in text


def test_missing_sections_are_skipped_with_a_line(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(FIXTURES / "adapter_throughput.json", inputs)
    out = tmp_path / "out"
    text = report.build_report([inputs], out).read_text()
    assert "## Text adapter" in text and (out / "adapter_throughput_cpu_fp32.png").exists()
    skipped = "_Not found: no JSON from `bench/loss_throughput.py` in the input folders; section skipped._"
    assert skipped in text
    assert "no JSON from `bench/embed_throughput.py`" in text
    assert "no `bench/gpu_check.py` output" in text
    assert len(list(out.glob("*.png"))) == 1


def test_malformed_json_is_an_error_naming_the_file(tmp_path):
    shutil.copy(FIXTURES / "loss_throughput.json", tmp_path)
    bad = tmp_path / "embed_throughput.json"
    bad.write_text('{"rows": [1, 2,')
    with pytest.raises(report.ReportInputError, match=r"embed_throughput\.json: not valid JSON"):
        report.build_report([tmp_path], tmp_path / "out")
    assert report.main(["--in", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_recognised_file_missing_a_key_is_an_error_naming_it(tmp_path):
    data = json.loads((FIXTURES / "loss_throughput.json").read_text())
    del data["rows"][0]["median_ms"]
    (tmp_path / "loss.json").write_text(json.dumps(data))
    expected = r"loss\.json: rows\[0\] \(status ok\) lacks \['median_ms'\]"
    with pytest.raises(report.ReportInputError, match=expected):
        report.build_report([tmp_path], tmp_path / "out")


def test_unexpected_row_content_is_an_error_naming_the_file(tmp_path):
    data = json.loads((FIXTURES / "adapter_throughput.json").read_text())
    del data["rows"][1]["impl"]
    (tmp_path / "adapter.json").write_text(json.dumps(data))
    expected = r"adapter\.json: unexpected content for adapter \(KeyError"
    with pytest.raises(report.ReportInputError, match=expected):
        report.build_report([tmp_path], tmp_path / "out")


def test_gpu_check_reader_tolerates_any_schema(tmp_path):
    folder = tmp_path / "gpu"
    folder.mkdir()
    (folder / "summary.md").write_text("all stages ok\n")
    (folder / "stage_9.json").write_text(json.dumps({"whatever": [1, {"nested": True}], "passed": True}))
    (folder / "other_stage.json").write_text(json.dumps({"x": 1}))
    text = report.build_report([tmp_path], tmp_path / "out").read_text()
    assert "all stages ok" in text
    assert "`stage_9.json`: stage stage_9, status yes" in text


def test_gpu_check_stage_files_of_schema_1(tmp_path):
    """A stage file as bench/gpu_check.py writes it (llm2clip_fast.gpu_check/1), found by its schema id."""
    stage = {
        "schema": "llm2clip_fast.gpu_check/1", "stage": "loss_speed", "title": "fused vs materialised",
        "status": "fail", "quick": True, "device": "cpu", "timeout_s": 60.0, "elapsed_s": 12.5,
        "returncode": 0, "notes": [], "error": None,
        "results": [{"name": "clip", "status": "ok", "metrics": {"total_ms": 3.0}, "note": ""},
                    {"name": "siglip", "status": "fail", "metrics": {}, "note": "too slow"}],
    }
    assert report.classify(stage) == "gpu_check"
    (tmp_path / "loss_speed.json").write_text(json.dumps(stage))
    text = report.build_report([tmp_path], tmp_path / "out").read_text()
    assert ("`loss_speed.json`: stage loss_speed, status fail, 12.5 s, results: 1 ok, 0 skipped, 2 in all "
            "(fused vs materialised)") in text


def test_gpu_check_summary_headings_sit_under_the_section(tmp_path):
    folder = tmp_path / "gc"
    folder.mkdir()
    summary = "# GPU check\n\n| a |\n|---|\n| 1 |\n\n## env: ok\n\n```\n# a log line\n```\n"
    (folder / "summary.md").write_text(summary)
    text = report.build_report([tmp_path], tmp_path / "out").read_text()
    assert "\n### GPU check\n" in text and "\n#### env: ok\n" in text
    assert "\n# a log line\n" in text  # inside a code fence: left as it is
    assert "\n# GPU check\n" not in text


def test_classify_by_content():
    load = lambda name: json.loads((FIXTURES / name).read_text())
    assert report.classify(load("loss_throughput.json")) == "loss_clip"
    assert report.classify(load("loss_throughput_siglip.json")) == "loss_siglip"
    assert report.classify(load("distributed_memory.json")) == "distributed"
    assert report.classify(load("adapter_throughput.json")) == "adapter"
    assert report.classify(load("embed_throughput.json")) == "embed"
    assert report.classify(load("train_throughput_stage1.json")) == "train1"
    assert report.classify(load("stage2_throughput.json")) == "stage2"
    assert report.classify(load("cache_throughput.json")) == "other"


def test_machine_description_names_cpu_libraries_and_date():
    from bench._common import machine_description

    m = machine_description()
    assert m["cpu_model"] and isinstance(m["cpu_flags"], list)
    assert m["libraries"]["torch"] and m["date_utc"].endswith("+00:00")


def test_quick_runs_each_bench_then_reports(tmp_path, monkeypatch):
    """--quick: every script present runs with --quick --out; a failing one is a note and exit 1."""
    bench = tmp_path / "bench"
    bench.mkdir()
    fixture = FIXTURES / "adapter_throughput.json"
    (bench / "adapter_throughput.py").write_text(
        "import shutil, sys\n"
        "assert '--quick' in sys.argv\n"
        f"shutil.copy({str(fixture)!r}, sys.argv[sys.argv.index('--out') + 1])\n"
    )
    (bench / "stage2_throughput.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.setattr(report, "BENCH_DIR", bench)
    out = tmp_path / "out"
    assert report.main(["--quick", "--out", str(out)]) == 1
    text = (out / "report.md").read_text()
    assert (out / "results" / "adapter_throughput.json").exists()
    assert "## Text adapter" in text and (out / "adapter_throughput_cpu_fp32.png").exists()
    assert "bench/stage2_throughput.py --quick exited with 3" in text
    assert "bench/loss_throughput.py does not exist here; not run." in text


@pytest.mark.slow
def test_report_from_fresh_quick_bench_runs(tmp_path):
    """The real scripts' --quick output (the cheap ones) goes through the report: their schema and the
    reader's stay in step."""
    out = tmp_path / "report"
    rc = report.main(["--quick", "--only", "loss_throughput", "distributed_memory", "--out", str(out)])
    text = (out / "report.md").read_text()
    assert rc == 0, text
    assert "## CLIP loss" in text and "_Not found: no JSON from `bench/loss_throughput.py` in" not in text
    assert "no JSON from `bench/loss_throughput.py --loss siglip`" not in text
    assert "ratio" in text.split("## Global-batch loss")[1]
    assert list(out.glob("loss_throughput_*_time_memory.png"))  # cpu_fp32 here, cuda_bf16 on a GPU
    assert list(out.glob("distributed_memory_D*.png"))
