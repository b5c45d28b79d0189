"""The stage-2 step's memory, attention kernel, gradient checkpointing, per-layer compilation and FLOPs.

The memory tests measure what torch's CPU allocator holds (the profiler's allocation events), not the
process's resident set: a step's peak RSS above an RSS baseline taken after a warm-up step depends on how
much of the warm-up's freed heap glibc hands back, and moved by 100+ MiB between runs of identical code,
which is how bench/stage2_throughput.py once showed our step above the plain one (1.20x and 1.37x).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench._common import cpu_peak_allocated_mb
from bench.stage2_throughput import openclip_clip_loss, plain_clip_loss
from llm2clip_fast.models import attention_kernels as AK
from llm2clip_fast.models.llm2clip import LLM2CLIPConfig, LLM2CLIPModel
from llm2clip_fast.models.text_adapter import TextAdapterReference
from llm2clip_fast.models.vision import VisionTower
from llm2clip_fast.train import step_memory
from llm2clip_fast.train.stage2 import MicroBatch, train_step
from llm2clip_fast.train.step_flops import stage2_step_flops

LLM_DIM, EMBED = 48, 32


def _model(preset: str = "micro") -> LLM2CLIPModel:
    torch.manual_seed(0)
    tower = VisionTower.from_preset(preset)
    return LLM2CLIPModel(LLM2CLIPConfig(vision=tower.config_dict(), embed_dim=EMBED, llm_dim=LLM_DIM),
                         vision_tower=tower).train()


def _micro(model: LLM2CLIPModel, batch: int) -> list[MicroBatch]:
    gen = torch.Generator().manual_seed(1)
    size = model.image_size
    return [MicroBatch(torch.randn(batch, 3, size, size, generator=gen),
                       (torch.randn(batch, LLM_DIM, generator=gen),))]


def test_cpu_peak_allocated_counts_live_bytes_only():
    keep = torch.ones(1 << 20)  # live before: not counted

    def fn() -> None:
        a = torch.empty(10 << 18)  # 10 MiB
        b = torch.empty(20 << 18)  # 20 MiB, both live: the peak
        del a, b
        c = torch.empty(5 << 18)
        del c

    assert cpu_peak_allocated_mb(fn) == pytest.approx(30.0, abs=0.01)
    assert keep.numel()


def _step_peak(model: LLM2CLIPModel, micro: list[MicroBatch], loss_fn) -> float:
    def step() -> None:
        train_step(model, micro, "clip", contextlib.nullcontext, torch.device("cpu"), loss_fn=loss_fn)
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazy allocations outside the measured step
    return cpu_peak_allocated_mb(step)


def test_our_step_holds_no_more_than_the_plain_step_that_keeps_the_logits():
    """The allocator's peak of our step (TextAdapter + fused clip_loss) against the plain step (eager
    adapter + the B x B logits) on the same tower and inputs: ours must not be above, and the measure
    must be exact (the same twice) so that a regression of a few MiB shows."""
    batch = 1024  # the logits are 4 MiB; the plain loss keeps them and their softmax gradients
    ours = _model()
    plain = copy.deepcopy(ours)
    reference = TextAdapterReference(LLM_DIM, EMBED)
    reference.load_state_dict(ours.text_adapter.state_dict())
    plain.text_adapter = reference
    micro = _micro(ours, batch)
    ours_mb = _step_peak(ours, micro, None)
    assert _step_peak(ours, micro, None) == pytest.approx(ours_mb, abs=0.01)
    plain_mb = _step_peak(plain, micro, plain_clip_loss)
    openclip_mb = _step_peak(plain, micro, openclip_clip_loss)
    logits_mb = batch * batch * 4 / 2**20
    assert ours_mb <= plain_mb, (ours_mb, plain_mb)
    assert plain_mb - ours_mb >= logits_mb, "the plain step should hold at least one B x B matrix more"
    assert openclip_mb >= plain_mb


def _saved_for_backward(model, image, text_in) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The activations (not parameters) the step's text adapter and loss save for backward, and the loss."""
    from llm2clip_fast.train.stage2 import contrastive_loss

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        text = model.encode_text(text_in, normalize=True)
        loss = contrastive_loss("clip", image, text, model.logit_scale_value(), None)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = {t.untyped_storage().data_ptr(): t for t in saved
                   if t.untyped_storage().data_ptr() not in params}.values()
    return list(activations), loss


@pytest.mark.parametrize("budget", ["1MiB", None], ids=["recompute", "keep-logits"])
def test_loss_and_adapter_save_at_most_the_kept_logits_for_backward(monkeypatch, budget):
    """What the step's text adapter and loss save for backward: O(B) rows in all, plus, only where the
    loss's memory budget lets it keep them (issue 24), the one fp32 B x B logit matrix the plain step
    also saves; beyond the budget no B x B tensor at all."""
    from llm2clip_fast.ops import _chunking

    if budget is None:
        monkeypatch.delenv("LLM2CLIP_LOSS_MEMORY_BUDGET", raising=False)
    else:
        monkeypatch.setenv("LLM2CLIP_LOSS_MEMORY_BUDGET", budget)
    batch = 700
    model = _model()
    gen = torch.Generator().manual_seed(2)
    image = torch.nn.functional.normalize(torch.randn(batch, EMBED, generator=gen), dim=-1).requires_grad_()
    text_in = torch.randn(batch, LLM_DIM, generator=gen)
    activations, loss = _saved_for_backward(model, image, text_in)
    path = _chunking.last_path("clip_loss")
    assert path == ("recompute" if budget else "keep-logits"), path
    squares = [t for t in activations if t.numel() >= batch * batch / 4]
    if budget:
        assert not squares, [tuple(t.shape) for t in squares]
    else:  # the kept logits, once, in fp32: nothing else B x B
        assert [(tuple(t.shape), t.dtype) for t in squares] == [((batch, batch), torch.float32)]
    # O(B) in all: per caption, a few adapter-width rows per block (4 blocks here)
    widest = model.config.llm_dim * model.config.adapter["expansion"]
    rest = sum(t.numel() for t in activations if t.numel() < batch * batch / 4)
    assert rest <= 20 * batch * widest
    loss.backward()
    # The same hook sees the plain loss's B x B logits: the test can tell.
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plain_clip_loss("clip", image, model.encode_text(text_in, normalize=True).detach(),
                        model.logit_scale_value(), None)
    assert max(t.numel() for t in saved) >= batch * batch


# -------------------------------------------------------------------------------------------------------
# Gradient checkpointing and compilation


def _grads(model: LLM2CLIPModel, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.encode_image(pixels).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_any_number_of_layers_gives_the_same_gradients():
    model = _model()
    pixels = torch.randn(3, 3, 32, 32)
    reference = _grads(model, pixels)
    for layers, expected in ((1, 1), (2, 2), (True, 2), (False, 0)):
        model.vision.set_gradient_checkpointing(layers)
        assert model.vision.checkpointed_layers == expected
        got = _grads(model, pixels)
        for name, g in reference.items():
            torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match=r"layers in 0\.\.2"):
        model.vision.set_gradient_checkpointing(3)


def test_checkpointed_layers_save_less_and_copies_stay_independent():
    model = _model()
    model.vision.set_gradient_checkpointing(2)
    clone = copy.deepcopy(model)
    # the copy's wrapped forward runs the copy's own layer, not the original's
    layer = clone.vision.layer_modules()[0]
    assert layer.forward.args[0] is layer
    profile = step_memory.profile_activations(_model(), torch.device("cpu"), contextlib.nullcontext)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model.encode_image(torch.randn(2, 3, 32, 32))
    assert sum(saved) < 2 * profile.total


@pytest.mark.slow
def test_compiled_layers_with_checkpointing_give_the_same_gradients():
    model = _model()
    pixels = torch.randn(3, 3, 32, 32)
    reference = _grads(model, pixels)
    model.vision.set_gradient_checkpointing(1)
    model.vision.compile_layers()
    assert model.vision.layers_compiled
    got = _grads(model, pixels)
    for name, g in reference.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_activation_profile_predicts_the_measured_peak():
    model = _model()
    profile = step_memory.profile_activations(model, torch.device("cpu"), contextlib.nullcontext,
                                              lambda b: (torch.randn(b, LLM_DIM),))
    assert len(profile.layers) == 2 and all(a > x > 0 for a, x in zip(profile.layers, profile.layer_inputs))
    batch = 256
    pixels, text = torch.randn(batch, 3, 32, 32), torch.randn(batch, LLM_DIM)
    for layers in (0, 2):
        model.vision.set_gradient_checkpointing(layers)

        def fwd_bwd() -> None:
            out = model(pixels, text)
            (out["image_features"].sum() + out["text_features"].sum()).backward()

        fwd_bwd()
        measured = cpu_peak_allocated_mb(fwd_bwd) * 2**20
        estimate = step_memory.estimate_bytes(profile, batch, layers)
        # conservative (never below what the step took) and not wildly so
        assert measured * 0.95 <= estimate <= measured * 1.5, (layers, measured, estimate)


def test_plan_checkpointing_by_memory():
    profile = step_memory.ActivationProfile(layers=(100,) * 4, layer_inputs=(10,) * 4, other=50)
    batch = 10
    full = step_memory.estimate_bytes(profile, batch, 4)
    none = step_memory.estimate_bytes(profile, batch, 0)
    plan = step_memory.plan_checkpointing("auto", profile, batch, 4, budget_bytes=none)
    assert (plan.mode, plan.layers) == ("none", 0)
    plan = step_memory.plan_checkpointing("auto", profile, batch, 4, budget_bytes=none - 1)
    assert (plan.mode, plan.layers) == ("selective", 1) and plan.estimate_bytes <= none - 1
    plan = step_memory.plan_checkpointing("auto", profile, batch, 4, budget_bytes=full)
    assert plan.mode in ("selective", "full") and plan.estimate_bytes <= full
    plan = step_memory.plan_checkpointing("auto", profile, batch, 4, budget_bytes=full // 10)
    assert (plan.mode, plan.layers) == ("full", 4) and "out-of-memory" in plan.why
    assert step_memory.plan_checkpointing("selective", profile, batch, 4, budget_bytes=10**9).layers == 1
    assert step_memory.plan_checkpointing("full", None, batch, 4, budget_bytes=None).layers == 4
    assert step_memory.plan_checkpointing("none", profile, batch, 4, budget_bytes=0).layers == 0
    with pytest.raises(ValueError, match="must be one of"):
        step_memory.plan_checkpointing("some", profile, batch, 4, budget_bytes=0)
    assert "selective (1/4 layers" in step_memory.plan_checkpointing(
        "auto", profile, batch, 4, budget_bytes=none - 1).summary()


# -------------------------------------------------------------------------------------------------------
# Attention kernel


def test_attention_kernel_is_observed_not_assumed():
    shape = AK.AttentionShape(2, 2, 17, 32)
    assert AK.observed_kernel(shape) == "flash"  # SDPA's fused CPU kernel
    assert AK.observed_kernel(shape, "math") == "math"
    avail = AK.kernel_availability(shape)
    assert avail["flash"] == [] and avail["math"] == []
    assert avail["cudnn"] and avail["efficient"] and avail["xformers"]
    choice = AK.choose_kernel(shape)
    assert choice.kernel == "flash" and choice.how == "sdpa default" and "cudnn" in choice.refusals
    with pytest.raises(ValueError, match="cannot serve"):
        AK.choose_kernel(shape, forced="cudnn")
    with pytest.raises(ValueError, match="must be one of"):
        AK.choose_kernel(shape, forced="fastest")


@pytest.mark.parametrize("kernel", ["math", "flash"])
def test_pinned_kernel_runs_in_the_tower_and_keeps_its_output(kernel):
    model = _model()
    pixels = torch.randn(2, 3, 32, 32)
    expected = model.encode_image(pixels)
    model.vision.set_attention_kernel(kernel)
    recorder = AK._RecordOps()
    with recorder:
        got = model.encode_image(pixels)
    assert AK._kernel_of(recorder.ops) == kernel
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    heads, tokens, head_dim = model.vision.attention_geometry()
    assert (heads, tokens, head_dim) == (2, 17, 32)
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        model.vision.set_attention_kernel("fast")


def test_info_reports_the_attention_kernels():
    from llm2clip_fast import info

    data = info.collect()
    rows = {(r["device"], r["dtype"]): r for r in data["attention"]}
    assert rows[("cpu", "float32")]["serves"] == "flash"
    assert "xformers" in rows[("cpu", "float32")]["refusals"]
    assert "attention kernels" in info.render(data)


# -------------------------------------------------------------------------------------------------------
# FLOPs


def test_step_flops_match_torch_flop_counter():
    """Our model-FLOP formula against torch's FlopCounterMode on a real step. The counter misses the
    CPU flash-attention kernel and counts the patch convolution's backward once (its input needs no
    gradient); the formula counts both as model work (backward = 2 x forward), so add those back."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model("demo-tiny")
    batch = 3
    micro = _micro(model, batch)[0]
    with FlopCounterMode(display=False) as counter:
        out = model(micro.pixel_values, *micro.text_inputs)
        (out["image_features"] * out["text_features"]).sum().backward()
    ours = stage2_step_flops(model, batch)
    per_image = model.vision.flops_per_image()
    conv = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    expected = counter.get_total_flops() + 3 * batch * per_image["attention"] + conv
    assert ours["total"] - ours["loss"] == pytest.approx(expected, rel=1e-6)
    assert ours["loss"] == 6 * batch * batch * EMBED
    assert stage2_step_flops(model, batch, 4 * batch)["loss"] == 4 * ours["loss"]


# -------------------------------------------------------------------------------------------------------
# The trainer: what it chose, and the data paths end to end


@pytest.fixture(scope="module")
def jpeg_demo(tmp_path_factory) -> dict[str, Path]:
    """The reliability tests' tiny demo with its images re-encoded as 100-pixel JPEGs (so --decode reduced
    has something to reduce for the micro tower's 32-pixel crops) and a bag-of-words embedding cache."""
    import json as _json

    from _stage2_runs import make_demo
    from PIL import Image

    demo = make_demo(tmp_path_factory.mktemp("jpeg_demo"))
    manifest = demo["data"]
    rows = [_json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        png = manifest.parent / row["image"]
        jpg = png.with_suffix(".jpg")
        with Image.open(png) as im:
            im.convert("RGB").resize((100, 90), Image.Resampling.BICUBIC).save(jpg, quality=92)
        row["image"] = str(Path(row["image"]).with_suffix(".jpg"))
    manifest.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    return demo


def _train(demo, out: Path, *extra: str, steps: int = 3) -> dict[str, torch.Tensor]:
    from _stage2_runs import final_state, stage2_args

    from llm2clip_fast.train.__main__ import main as train_main

    assert train_main(stage2_args(demo, out, *extra, steps=steps)) == 0
    return final_state(out)


def test_uint8_hand_over_trains_bit_identically_to_float32(jpeg_demo, tmp_path):
    floats = _train(jpeg_demo, tmp_path / "f32", "--pixel-dtype", "float32")
    uint8 = _train(jpeg_demo, tmp_path / "u8")  # the default
    for name, value in floats.items():
        assert torch.equal(uint8[name], value), name
    import json as _json

    config = _json.loads((tmp_path / "u8" / "config.json").read_text())
    assert config["pixel_dtype"] == "uint8" and config["decode"] == "exact"
    step = config["step"]
    assert step["attention"]["kernel"] == "flash" and step["attention"]["how"] == "sdpa default"
    assert step["grad_checkpointing"]["mode"] == "none"  # the micro tower fits anywhere
    assert step["compile_tower"] == {"on": False, "why": step["compile_tower"]["why"]}
    summary = _json.loads((tmp_path / "u8" / "summary.json").read_text())
    assert {"first_step_s", "median_step_s", "warmup_s"} <= set(summary)


def test_reduced_decode_trains_and_resumes_exactly(jpeg_demo, tmp_path, monkeypatch):
    from _stage2_runs import final_state, stage2_args, stop_stage2_in_step

    from llm2clip_fast.train.__main__ import main as train_main

    whole = _train(jpeg_demo, tmp_path / "whole", "--decode", "reduced", "--save-every", "1", steps=4)
    exact = _train(jpeg_demo, tmp_path / "exact", steps=4)
    assert any(not torch.equal(whole[k], exact[k]) for k in whole), "reduced decoding changed no pixel"
    argv = stage2_args(jpeg_demo, tmp_path / "cut", "--decode", "reduced", "--save-every", "1", steps=4)
    stop_stage2_in_step(monkeypatch, argv, step=3)
    assert train_main([*argv, "--resume"]) == 0
    resumed = final_state(tmp_path / "cut")
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    # a run cannot switch decoding on resume: its batches would differ
    with pytest.raises(ValueError, match="decode"):
        train_main([*stage2_args(jpeg_demo, tmp_path / "cut", "--save-every", "1", steps=5), "--resume"])


@pytest.mark.parametrize("flags,message", [
    (["--decode", "gpu"], "--decode gpu: decoding JPEGs on the GPU needs a CUDA device"),
    (["--attention", "cudnn"], "attention kernel 'cudnn' cannot serve"),
    (["--decode", "gpu", "--pixel-dtype", "float32"], "drop --pixel-dtype float32"),
    (["--ddp-bucket-mb", "0"], "--ddp-bucket-mb must be > 0"),
])
def test_step_options_that_cannot_run_here_fail_with_the_reason(jpeg_demo, tmp_path, flags, message):
    from _stage2_runs import stage2_args

    from llm2clip_fast.train.__main__ import main as train_main

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_main(stage2_args(jpeg_demo, tmp_path / "run", *flags, steps=1))


def test_grad_checkpointing_flag_forms(jpeg_demo, tmp_path):
    import json as _json

    _train(jpeg_demo, tmp_path / "full", "--grad-checkpointing", steps=1)
    _train(jpeg_demo, tmp_path / "sel", "--grad-checkpointing", "selective", steps=1)
    full = _json.loads((tmp_path / "full" / "config.json").read_text())["step"]["grad_checkpointing"]
    sel = _json.loads((tmp_path / "sel" / "config.json").read_text())["step"]["grad_checkpointing"]
    assert (full["mode"], full["layers"]) == ("full", 2)
    assert (sel["mode"], sel["layers"]) == ("selective", 1)
