"""issue 19 items 3 and 4: --include/--exclude on resize and convert (extract's rule, one function),
and one definition of retained energy across extract, validate-extraction and resize."""
import json
import warnings

import pytest
import torch

from loratools.ops.common import selected


def _peft_adapter(model_dir, out, targets, seed=0):
    """An adapter made by PEFT itself (embedding LoRA included), its LoRA weights random (seeded)."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    m = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(out))


def _peft_logits(model_dir, adapter, ids, zero=None):
    """PeftModel's logits; ``zero``: a substring of the LoRA B weights set to zero before running."""
    import transformers as tf
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
        pm = PeftModel.from_pretrained(m, str(adapter)).eval()
    if zero:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if zero in n and ("lora_embedding_B" in n or "lora_B" in n):
                    p.zero_()
    with torch.no_grad():
        return pm(torch.tensor([ids])).logits[0]


def test_the_selection_rule_is_extracts():
    assert selected("model.layers.0.q_proj", None, None)
    assert not selected("model.embed_tokens", None, "embed")
    assert selected("model.embed_tokens", ["q_proj", "embed"], None)
    assert not selected("lm_head", ["q_proj", "embed"], ())
    assert not selected("model.layers.1.v_proj", None, ["q_proj", "v_proj"])
    from loratools.ops import extract as ex
    assert ex._selected is selected  # one function, not a copy


@pytest.mark.parametrize("cmd", ["convert", "resize"])
def test_exclude_drops_the_embedding_lora_and_peft_loads_the_rest(fx, tmp_path, run_cli, cmd):
    from loratools import api

    model = fx / "models" / "llama"
    _peft_adapter(model, tmp_path / "a", ["q_proj", "v_proj", "embed_tokens"])
    args = ["--to", "peft"] if cmd == "convert" else ["--rank", "4"]
    code, out, err = run_cli(cmd, tmp_path / "a", "-o", tmp_path / "b", *args, "--exclude", "embed_tokens", "--json")
    assert code == 0, err
    rep = json.loads(out)
    # PEFT saves the embedding weights beside an embedding LoRA (save_embedding_layers): a modules_to_save tensor
    assert rep["dropped"] == ["model.embed_tokens", "model.embed_tokens.weight"]
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert "embed_tokens" not in json.dumps(cfg["target_modules"])
    ids = api.tokenize(model, "The quick brown fox jumps over the lazy dog")
    want = _peft_logits(model, tmp_path / "a", ids, zero="embed_tokens")
    full = _peft_logits(model, tmp_path / "a", ids)
    got = _peft_logits(model, tmp_path / "b", ids)
    assert float((full - want).abs().max()) > 1e-2  # the embedding LoRA mattered
    assert float((got - want).abs().max()) < 1e-4
    # the text report says what was dropped
    code, out, err = run_cli(cmd, tmp_path / "a", "-o", tmp_path / "c", *args, "--include", "q_proj", "--include", "v_proj")
    assert code == 0, err
    assert "dropped 2 module(s): model.embed_tokens, model.embed_tokens.weight" in out


@pytest.mark.parametrize("cmd", ["convert", "resize"])
def test_excluding_everything_is_a_one_line_error_and_writes_nothing(fx, tmp_path, run_cli, cmd):
    args = ["--to", "peft"] if cmd == "convert" else ["--rank", "2"]
    code, out, err = run_cli(cmd, fx / "adapters" / "llama-patterns", "-o", tmp_path / "b", *args, "--exclude", ".")
    assert code != 0 and "nothing to write" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    code, out, err = run_cli(cmd, fx / "adapters" / "llama-patterns", "-o", tmp_path / "b", *args, "--exclude", "(")
    assert code != 0 and "invalid regex" in err and not (tmp_path / "b").exists()


def test_modules_to_save_are_selected_by_module_name():
    from loratools.adapter import Adapter, LoraModule
    from loratools.ops.common import select_adapter

    a = Adapter(modules={"model.layers.0.q_proj": LoraModule(torch.ones(1, 2), torch.ones(2, 1), 1.0)},
                modules_to_save={"lm_head.weight": torch.zeros(3, 2)})
    b, dropped = select_adapter(a, exclude="lm_head")
    assert dropped == ["lm_head.weight"] and not b.modules_to_save and set(b.modules) == set(a.modules)
    assert a.modules_to_save  # the input is left alone


@pytest.mark.parametrize("model,kw", [("llama", dict(rank=2)), ("llama", dict(rank=3, exact=True)),
                                      ("qwen2", dict(rank=4)), ("llama", dict(budget=20000)),
                                      ("llama", dict(rank=2, embeddings="full")),
                                      ("llama", dict(rank=2, exclude="down_proj"))])
def test_retained_energy_is_one_number_in_extract_and_validate_extraction(fx, tmp_path, run_cli, model, kw):
    """extract's retained energy (Σ kept σ² / Σ σ², all modules) equals what validate-extraction
    measures on the written adapter, 1 − ‖ΔW − ΔŴ‖² / ‖ΔW‖² over every tensor of the fine-tune."""
    from loratools.ops.extract import extract
    from loratools.ops.factor import RankRule

    base, tuned = fx / "models" / model, fx / "models" / f"{model}-tuned"
    rule = RankRule("rank", kw.pop("rank", 16))
    _, rep = extract(base, tuned, tmp_path / "a", rule, **kw)
    code, out, err = run_cli("validate-extraction", "--base", base, "--tuned", tuned, "-a", tmp_path / "a", "--json")
    assert code == 0, err
    v = json.loads(out)
    assert v["total_delta_energy"] == pytest.approx(rep["total_delta_energy"], rel=1e-9)
    assert v["retained_energy"] == pytest.approx(rep["retained_energy"], abs=2e-5)
    assert 0 < v["retained_energy"] < 1
    # the unweighted mean is another number, under another name
    assert "mean_module_retained_energy" not in v and 0 < v["mean_module_retention"] <= 1
    code, out, err = run_cli("validate-extraction", "--base", base, "--tuned", tuned, "-a", tmp_path / "a")
    assert f"retained energy {100 * rep['retained_energy']:.2f}%" in out and "mean per-module retention" in out


def test_resize_reports_retention_against_its_input_not_retained_energy(fx, tmp_path, run_cli):
    """resize sees only the adapter: its ratio is "retained vs input adapter", energy-weighted, and
    for an extracted adapter it is the fine-tune's kept energy at the smaller rank over that at the
    larger (a truncated SVD of a truncated SVD)."""
    from loratools.ops.extract import extract
    from loratools.ops.factor import RankRule

    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    _, r6 = extract(base, tuned, tmp_path / "a6", RankRule("rank", 6), exact=True)
    _, r3 = extract(base, tuned, None, RankRule("rank", 3), exact=True)
    code, out, err = run_cli("resize", tmp_path / "a6", "-o", tmp_path / "a3", "--rank", "3", "--json")
    assert code == 0, err
    rz = json.loads(out)
    assert "retained_energy" not in rz
    assert rz["retained_vs_input"] == pytest.approx(r3["retained_energy"] / r6["retained_energy"], rel=1e-4)
    code, out, err = run_cli("resize", tmp_path / "a6", "-o", tmp_path / "b3", "--rank", "3")
    assert "retained vs input adapter" in out and "retained energy" not in out
