"""A tiny official EVA02-CLIP checkpoint (llm2clip/eva_clip's CustomCLIP: visual tower, TextProj adapter,
logit scale) and its model config on disk: what the EVA-CLIP converter tests and the tests that build on a
converted or plain EVA-CLIP file share. Building the tower needs timm (``_timm_environment.require_timm``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _eva_clip_reference import build_visual
from _llm2clip_official_reference import TextProj
from safetensors.torch import save_file

LLM_DIM, EMBED_DIM, BLOCKS = 24, 20, 3
# An official-format model config (llm2clip/eva_clip/model_configs/EVA02-CLIP-*.json), shrunk: 4 heads of
# 16, the official mlp_ratio (int(64 * 2.6667) = 170 hidden), the 224/14 RoPE reference grid.
TINY = {"embed_dim": EMBED_DIM, "vision_cfg": {
    "image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.6667,
    "eva_model_name": "eva-clip-tiny", "drop_path_rate": 0, "xattn": True, "fusedLN": True, "rope": True,
    "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True}}


def _official(seed: int = 0, config: dict = TINY, llm_dim: int = LLM_DIM):
    torch.manual_seed(seed)
    visual = build_visual(config["embed_dim"], config["vision_cfg"]).eval()
    text = TextProj(embedding_dim=llm_dim, output_dim=config["embed_dim"], expansion_factor=2,
                    num_layers_text=BLOCKS).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight non-default, so a swapped or skipped tensor shows in the outputs
        for p in [*visual.parameters(), *text.parameters()]:
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (p == 1).float())  # LayerNorm weights ~1
    return visual, text, torch.tensor(4.1)


def _state(visual, text, logit_scale, qv_bias: str = "proj") -> dict[str, torch.Tensor]:
    """``CustomCLIP.state_dict()``; ``qv_bias="separate"``: baaivision EVA-CLIP's ``attn.q_bias`` and
    ``attn.v_bias``."""
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    state.update({f"text.{k}": v for k, v in text.state_dict().items()})
    state["logit_scale"] = logit_scale
    if qv_bias == "separate":
        state = {k.replace("attn.q_proj.bias", "attn.q_bias").replace("attn.v_proj.bias", "attn.v_bias"): v
                 for k, v in state.items()}
    return {k: v.detach().clone().contiguous() for k, v in state.items()}  # no shared storage (safetensors)


def _write(path: Path, state: dict[str, torch.Tensor], wrapper: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({wrapper: state} if wrapper else state, str(path))
    return path


def _config_file(tmp_path: Path, config: dict = TINY) -> str:
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(config))
    return str(path)
