"""The reference decoder against transformers' own implementation (fp32 logits)."""
import json
import shutil

import pytest
import torch

from loratools.models import load_model
from tests.conftest import ARCHS

transformers = pytest.importorskip("transformers")


def hf_logits(model_dir, ids, **kw):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        return m(ids, **kw).logits


def ids_for(seed=0, b=2, s=24, vocab=300):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS + ["llama-bf16-sharded"])
def test_logits_match_transformers(fx, arch):
    d = fx / "models" / arch
    ids = ids_for()
    ours, _ = load_model(d)(ids)
    ref = hf_logits(d, ids)
    assert ref.abs().max() > 1.0  # a non-trivial model
    assert (ours - ref).abs().max().item() <= 1e-5


def test_padding_mask_matches_transformers(fx):
    d = fx / "models" / "qwen2"
    ids = ids_for(1)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in the first row
    ours, _ = load_model(d)(ids, attention_mask=mask)
    ref = hf_logits(d, ids, attention_mask=mask)
    keep = mask.bool()
    assert (ours[keep] - ref[keep]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_kv_cache_equals_full_forward(fx, arch):
    model = load_model(fx / "models" / arch)
    ids = ids_for(2, b=1, s=16)
    full, _ = model(ids)
    logits, past = model(ids[:, :10])
    steps = [logits]
    for t in range(10, 16):
        lg, past = model(ids[:, t:t + 1], past=past)
        steps.append(lg)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def _variant(fx, tmp_path, arch, name="variant", **changes):
    d = tmp_path / f"{arch}-{name}"
    shutil.copytree(fx / "models" / arch, d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_rope_theta_is_read_from_both_config_generations(fx, tmp_path):
    """A 4.x-style config (top-level rope_theta) and a 5.x one (rope_parameters) give the same
    model; a reader that knew only one would compute another model and this test would fail."""
    d5 = fx / "models" / "qwen3"  # rope_parameters
    cfg = json.loads((d5 / "config.json").read_text())
    d4 = _variant(fx, tmp_path, "qwen3", rope_parameters=None, rope_theta=cfg["rope_parameters"]["rope_theta"])
    wrong = _variant(fx, tmp_path, "qwen3", name="no-theta", rope_parameters=None)
    ids = ids_for(3)
    a, _ = load_model(d5)(ids)
    b, _ = load_model(d4)(ids)
    c, _ = load_model(wrong)(ids)  # falls back to theta 10000: a different model
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (b - hf_logits(d4, ids)).abs().max() <= 1e-5


def test_sliding_window_is_applied(fx, tmp_path):
    """mistral fixture has sliding_window=8; with 24 tokens it changes the result."""
    ids = ids_for(4)
    windowed, _ = load_model(fx / "models" / "mistral")(ids)
    full, _ = load_model(_variant(fx, tmp_path, "mistral", sliding_window=None))(ids)
    assert torch.allclose(windowed[:, :8], full[:, :8], atol=1e-6)
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3


def test_untied_tied_embeddings(fx, tmp_path):
    """qwen2 ties lm_head to embed_tokens: the checkpoint has no lm_head.weight."""
    from loratools.checkpoint import Checkpoint
    with Checkpoint.open(fx / "models" / "qwen2") as ck:
        assert "lm_head.weight" not in ck
    m = load_model(fx / "models" / "qwen2")
    assert m.lm_head.weight is m.model.embed_tokens.weight
