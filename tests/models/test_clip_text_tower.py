"""The CLIP-style text tower baseline: shapes, 77-token truncation, causal EOT pooling, save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2clip_fast.models.clip_text_tower import ClipTextTower, ClipTextTowerConfig

TINY = dict(embed_dim=24, width=32, layers=2, heads=4)


@pytest.fixture(scope="module")
def tower() -> ClipTextTower:
    torch.manual_seed(0)
    return ClipTextTower(ClipTextTowerConfig(**TINY)).eval()


def _reference_forward(tower: ClipTextTower, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLIP's text transformer written out in float64 from the tower's weights: explicit causal
    softmax attention per head, pre-LN residual blocks, exact GELU, final LN, EOT token, projection."""
    sd = {k: v.double() for k, v in tower.state_dict().items()}
    width, heads = tower.config.width, tower.config.heads
    hd = width // heads

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def lin(x, name):
        return x @ sd[f"{name}.weight"].t() + sd[f"{name}.bias"]

    n = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for i in range(tower.config.layers):
        p = f"blocks.{i}"
        q, k, v = lin(ln(x, f"{p}.ln_1"), f"{p}.attn.qkv").split(width, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], heads, hd).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / hd ** 0.5
        attn = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        x = x + lin(attn.transpose(1, 2).reshape(*x.shape), f"{p}.attn.out")
        h = lin(ln(x, f"{p}.ln_2"), f"{p}.mlp.0")
        x = x + lin(0.5 * h * (1 + torch.erf(h / 2 ** 0.5)), f"{p}.mlp.2")
    x = ln(x, "ln_final")
    eot = x[torch.arange(len(ids)), mask.sum(dim=1) - 1]
    return eot @ sd["text_projection.weight"].t()


def test_matches_a_written_out_clip_text_transformer(tower):
    ids, mask = tower.tokenize(["a red circle", "a small blue square above a green triangle"])
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape and ids.shape[0] == 2
    out = tower(ids, mask)
    assert out.shape == (2, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference_forward(tower, ids, mask), atol=1e-5, rtol=1e-5)


def test_truncates_to_77_and_keeps_end_of_text(tower):
    long_text = " ".join(["red circle"] * 100)
    ids, mask = tower.tokenize([long_text, "a dog"])
    assert ids.shape[1] == 77 and int(mask[0].sum()) == 77
    sep = tower.tokenizer.sep_token_id
    assert int(ids[0, -1]) == sep and int(ids[1, int(mask[1].sum()) - 1]) == sep


def test_text_after_the_context_is_invisible(tower):
    prefix = " ".join(["a large red circle left of a blue square"] * 10)
    a, b = tower.encode([prefix + " and a yellow star", prefix + " and a purple hexagon"])
    torch.testing.assert_close(a, b)
    c, d = tower.encode(["a yellow star", "a purple hexagon"])
    assert not torch.allclose(c, d)


def test_padding_does_not_change_the_embedding(tower):
    # Batched with a longer caption (so padded) against alone: same features (causal mask, EOT pool).
    together = tower.encode(["a cat", "a very long caption about many coloured shapes"])
    alone = tower.encode(["a cat"])
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_every_parameter(tower):
    ids, mask = tower.tokenize(["a red circle", "two blue squares"])
    tower.zero_grad()
    tower(ids, mask).square().sum().backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # Rows of the embedding table for unseen tokens get zero grad; the table as a whole does not.
    assert missing == [], missing


def test_save_load_round_trip(tower, tmp_path):
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(path))
    config = ClipTextTowerConfig.from_dict(tower.config.to_dict())
    loaded = ClipTextTower(config).eval()
    loaded.load_state_dict(load_file(str(path)))
    texts = ["a red circle", "a blue square left of a green triangle"]
    assert torch.equal(loaded.encode(texts), tower.encode(texts))


def test_bad_inputs(tower):
    with pytest.raises(ValueError, match="divisible"):
        ClipTextTowerConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="unknown"):
        ClipTextTowerConfig.from_dict({"widht": 3})
    with pytest.raises(TypeError, match="list of strings"):
        tower.tokenize("not a list")
    with pytest.raises(ValueError, match="context"):
        tower(torch.zeros(1, 78, dtype=torch.long), torch.ones(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tower(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))
