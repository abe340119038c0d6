"""Extraction, resize, combination and merge: exact against dense ground truth, loaded by the peers."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from loratools import api, st
from loratools.checkpoint import Checkpoint
from loratools.errors import IncompatibleError, InputError, LoratoolsError, UnsupportedError
from loratools.formats.peft import read_peft, write_peft
from loratools.models import load_model
from loratools.ops.combine import combine, dense_merge, scale_adapter
from loratools.ops.extract import extract
from loratools.ops.factor import RankRule
from loratools.ops.merge import merge
from loratools.ops.resize import resize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
IDS = torch.randint(0, 380, (2, 16), generator=torch.Generator().manual_seed(3))


def deltas(fx, arch):
    with Checkpoint.open(fx / "models" / arch) as b, Checkpoint.open(fx / "models" / f"{arch}-tuned") as t:
        return {k: t.get(k).double() - b.get(k).double() for k in b.keys()}


def logits(model_dir, adapters=(), weights=None):
    return load_model(model_dir, adapters=adapters, weights=weights)(IDS)[0]


def peft_logits(model_dir, adapter_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(m.eval(), str(adapter_dir))(IDS).logits


def hf_logits(model_dir):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return m.eval()(IDS).logits


# -- extract ---------------------------------------------------------------------------------
def test_extract_full_rank_reconstructs_delta(fx):
    a, rep = extract(fx / "models" / "llama", fx / "models" / "llama-tuned", None, RankRule("energy", 1.0), exact=True)
    d = deltas(fx, "llama")
    for name, m in a.modules.items():
        ref = d[f"{name}.weight"]
        assert float((m.delta().double() - ref).norm() / ref.norm()) < 2e-6, name
    assert "model.embed_tokens" in a.modules and a.modules["model.embed_tokens"].kind == "embedding"
    assert rep["norms"] and any("norm weights" in w for w in rep["warnings"])


@pytest.mark.parametrize("exact", [False, True])
def test_extract_rank_k_error_vs_optimal(fx, exact):
    a, rep = extract(fx / "models" / "llama", fx / "models" / "llama-tuned", None, RankRule("rank", 4), exact=exact)
    d = deltas(fx, "llama")
    for name, m in a.modules.items():
        ref = d[f"{name}.weight"]
        ref = ref.T.T
        err = float((m.delta().double() - ref).norm() / ref.norm())
        S = torch.linalg.svdvals(ref)
        opt = math.sqrt(float(S[4:].pow(2).sum() / S.pow(2).sum()))
        assert m.rank == 4
        assert err <= opt * (1 + 1e-6 if exact else 1.01), name
        entry = rep["modules"].get(name) or rep["embeddings"][name]
        assert abs(entry["rel_error"] - err) < 1e-4


def test_extracted_adapter_loads_in_peft_with_matching_logits(fx, tmp_path):
    base = fx / "models" / "qwen2"
    out = tmp_path / "ex"
    a, rep = extract(base, fx / "models" / "qwen2-tuned", out, RankRule("energy", 0.95), seed=1)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] or len(set(a.ranks.values())) == 1
    assert (out / "extract_report.json").exists()
    ours = logits(base, [read_peft(out)])
    assert (ours - peft_logits(base, out)).abs().max() <= 1e-5
    # the adapter carries most of the fine-tune: closer to the tuned model than the base is
    tuned = logits(fx / "models" / "qwen2-tuned")
    assert (ours - tuned).abs().mean() < 0.5 * (logits(base) - tuned).abs().mean()


def test_extract_embeddings_modes(fx, tmp_path):
    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    a, _ = extract(base, tuned, tmp_path / "full", RankRule("rank", 4), embeddings="full")
    assert set(a.modules_to_save) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert (logits(base, [read_peft(tmp_path / "full")]) - peft_logits(base, tmp_path / "full")).abs().max() <= 1e-5
    a, rep = extract(base, tuned, None, RankRule("rank", 4), embeddings="skip")
    assert "model.embed_tokens" not in a.modules and "lm_head" not in a.modules
    assert any("embed_tokens.weight: delta skipped, losing" in w for w in rep["warnings"])


def test_extract_budget_spends_at_most_the_budget_and_beats_uniform(fx):
    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    uni, urep = extract(base, tuned, None, RankRule("rank", 3), exact=True, embeddings="skip")
    budget = uni.num_parameters()
    a, rep = extract(base, tuned, None, RankRule("rank", 16), budget=budget, exact=True, embeddings="skip")
    assert a.num_parameters() <= budget
    kept = lambda r: sum(m["energy"] * m["total_energy"] for m in r["modules"].values())  # noqa: E731
    assert kept(rep) >= kept(urep)
    assert len(set(a.ranks.values())) > 1


def test_extract_budget_scratch_is_beside_the_output_and_removed(fx, tmp_path, monkeypatch):
    """With a budget, each module's cap-rank factors wait in a scratch folder beside the output;
    the folder is gone afterwards and the adapter holds the allocated slices of them."""
    import loratools.ops.extract as ex

    seen = []
    real_save = st.save_file
    monkeypatch.setattr(ex.st, "save_file", lambda t, p: (seen.append((Path(p).parent, {k: v.clone() for k, v in t.items()})),
                                                          real_save(t, p))[1])
    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    a, rep = extract(base, tuned, tmp_path / "b", RankRule("rank", 16), budget=20_000, exact=True, embeddings="skip")
    scratch = [(d, t) for d, t in seen if d.name.startswith(".loratools-extract-")]  # (write_peft saves too)
    assert len(scratch) >= len(a.modules) and all(d.parent == tmp_path for d, _ in scratch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    caps = [t for _, t in scratch]
    for name, m in a.modules.items():  # each module is the leading block of one scratch entry
        assert any(torch.equal(m.A, c["A"][:m.rank]) and torch.equal(m.B, c["B"][:, :m.rank]) for c in caps), name
    written = read_peft(tmp_path / "b")
    assert all(torch.equal(written.modules[n].A, m.A) for n, m in a.modules.items())


def test_extract_is_deterministic(fx, tmp_path):
    for name in ("x", "y"):
        extract(fx / "models" / "llama", fx / "models" / "llama-tuned", tmp_path / name, RankRule("rank", 4), seed=7)
    a = (tmp_path / "x" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "y" / "adapter_model.safetensors").read_bytes()


def _copy(fx, tmp_path, arch, name):
    d = tmp_path / name
    shutil.copytree(fx / "models" / arch, d)
    return d


def test_extract_bad_inputs(fx, tmp_path):
    base = fx / "models" / "llama"
    with pytest.raises(IncompatibleError, match="llama but tuned is qwen3"):
        extract(base, fx / "models" / "qwen3", None)
    # key mismatch
    t = _copy(fx, tmp_path, "llama-tuned", "keys")
    sd = st.load_file(t / "model.safetensors")
    sd["extra.weight"] = torch.zeros(2, 2)
    st.save_file(sd, t / "model.safetensors")
    with pytest.raises(IncompatibleError, match="different tensors.*extra.weight"):
        extract(base, t, None)
    # shape mismatch / vocab
    t = _copy(fx, tmp_path, "llama-tuned", "vocab")
    sd = st.load_file(t / "model.safetensors")
    sd["model.embed_tokens.weight"] = torch.zeros(400, 64)
    st.save_file(sd, t / "model.safetensors")
    cfg = json.loads((t / "config.json").read_text())
    cfg["vocab_size"] = 400
    (t / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleError, match="different vocab sizes"):
        extract(base, t, None)
    cfg["vocab_size"] = 384
    (t / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleError, match="model.embed_tokens.weight.*384.*400"):
        extract(base, t, None)
    # NaN
    t = _copy(fx, tmp_path, "llama-tuned", "nan")
    sd = st.load_file(t / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    st.save_file(sd, t / "model.safetensors")
    with pytest.raises(InputError, match="up_proj.weight.*NaN"):
        extract(base, t, None)
    with pytest.raises(LoratoolsError, match="exceeds"):
        extract(base, fx / "models" / "llama-tuned", None, RankRule("rank", 65))


def test_extract_cli(fx, tmp_path, run_cli):
    code, out, err = run_cli("extract", "--base", fx / "models" / "llama", "--tuned", fx / "models" / "llama-tuned",
                             "-o", tmp_path / "a", "--energy", "0.9", "--max-rank", "6", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert all(1 <= r <= 6 for r in rep["ranks"].values())
    code, _, err = run_cli("extract", "--base", fx / "models" / "llama", "--tuned", fx / "models" / "llama-tuned",
                           "-o", tmp_path / "b", "--energy", "0.9", "--rank", "4")
    assert code == 2 and "at most one of" in err


# -- resize ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama-patterns", "llama-rslora", "qwen2-bias"])
def test_resize_equals_dense_truncation(fx, name):
    a = read_peft(fx / "adapters" / name)
    r, rep = resize(a, RankRule("rank", 2))
    for n, m in a.modules.items():
        dense = m.delta().double()
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        got = r.modules[n].delta().double()
        assert float((got - best).norm() / dense.norm()) < 1e-5, n
        assert torch.allclose(torch.tensor(rep["modules"][n]["singular_values"], dtype=torch.float64), S[:2], rtol=1e-4)
        if m.bias is not None:
            assert torch.allclose(r.modules[n].bias * r.modules[n].scale, m.bias * m.scale)


def test_resize_loads_in_peft_and_kohya_input(fx, tmp_path, run_cli):
    base = fx / "models" / "llama"
    code, _, err = run_cli("resize", fx / "adapters" / "llama-patterns", "-o", tmp_path / "r", "--rank", "3", "--base", base)
    assert code == 0, err
    assert (logits(base, [read_peft(tmp_path / "r")]) - peft_logits(base, tmp_path / "r")).abs().max() <= 1e-5
    code, _, err = run_cli("resize", fx / "adapters" / "mistral-kohya.safetensors", "-o", tmp_path / "k.safetensors",
                           "--energy", "0.9")
    assert code == 0, err
    assert api.detect(tmp_path / "k.safetensors") == "kohya"
    # --rank is a cap: above every module's rank (even above a module's width) nothing changes
    code, _, err = run_cli("resize", fx / "adapters" / "llama-rslora", "-o", tmp_path / "x", "--rank", "65")
    assert code == 0, err
    src, out = read_peft(fx / "adapters" / "llama-rslora"), read_peft(tmp_path / "x")
    assert out.ranks == src.ranks
    assert all(torch.allclose(out.modules[n].delta(), m.delta(), atol=1e-6) for n, m in src.modules.items())


def test_resize_keeps_lower_ranks():
    from loratools.adapter import Adapter, LoraModule
    a = Adapter(modules={"m": LoraModule(torch.randn(2, 8), torch.randn(8, 2), 1.0)})
    r, _ = resize(a, RankRule("rank", 4))
    assert r.modules["m"].rank == 2


# -- combine ---------------------------------------------------------------------------------
def _pair(fx):
    return read_peft(fx / "adapters" / "llama-patterns"), read_peft(fx / "adapters" / "llama-rslora")


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_combination_is_exact(fx, method):
    a, b = _pair(fx)
    c = combine([a, b], [0.7, -1.3], method)
    for n in set(a.modules) | set(b.modules):
        ref = sum((x.modules[n].delta().double() * w for x, w in ((a, 0.7), (b, -1.3)) if n in x.modules))
        assert float((c.modules[n].delta().double() - ref).norm() / ref.norm()) < 1e-6, n
        assert c.modules[n].rank == sum(x.modules[n].rank for x in (a, b) if n in x.modules)
    # and through the model: linear combination == both adapters applied unmerged with weights
    base = fx / "models" / "llama"
    assert (logits(base, [c]) - logits(base, [a, b], [0.7, -1.3])).abs().max() <= 5e-5  # fp32 summation order


def test_svd_combination_is_optimal(fx):
    a, b = _pair(fx)
    c = combine([a, b], [1.0, 0.5], "svd", rank=5)
    for n in b.modules:
        ref = a.modules[n].delta().double() + 0.5 * b.modules[n].delta().double()
        U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
        best = (U[:, :5] * S[:5]) @ Vh[:5]
        assert float((c.modules[n].delta().double() - best).norm() / ref.norm()) < 1e-5, n


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
def test_dense_merges_equal_peft_definitions(method):
    from peft.utils import merge_utils
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(20, 30, generator=g) for _ in range(3)]
    w = [0.5, 1.0, -0.7]
    ours = dense_merge(ts, w, method, 0.4)
    ref = getattr(merge_utils, method)(ts, torch.tensor(w), 0.4)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_dare_is_seeded_rescaled_and_ties_elects_signs():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 100, generator=g)
    x = dense_merge([t], [1.0], "dare_linear", 0.3, torch.Generator().manual_seed(5))
    y = dense_merge([t], [1.0], "dare_linear", 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(x, y)
    kept = x != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.02
    assert torch.allclose(x[kept], t[kept] / 0.3)
    z = dense_merge([t, -t * 0.5], [1.0, 1.0], "dare_ties", 1.0, torch.Generator().manual_seed(1))
    assert torch.allclose(z, t)  # the sign of t wins everywhere; -t/2 disagrees and is dropped


def test_combine_dense_methods_end_to_end(fx, tmp_path, run_cli):
    for method in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        out = tmp_path / method
        code, _, err = run_cli("combine", fx / "adapters" / "llama-patterns", fx / "adapters" / "llama-rslora",
                               "--method", method, "--density", "0.5", "--rank", "4", "--weights", "1,0.5", "-o", out)
        assert code == 0, err
        assert set(read_peft(out).ranks.values()) == {4}


def test_scale_and_subtract(fx, tmp_path, run_cli):
    a, b = _pair(fx)
    s = scale_adapter(a, 0.25)
    for n, m in a.modules.items():
        assert torch.allclose(s.modules[n].delta(), 0.25 * m.delta())
    code, _, err = run_cli("subtract", fx / "adapters" / "llama-patterns", fx / "adapters" / "llama-patterns", "-o", tmp_path / "z")
    assert code == 0, err
    z = read_peft(tmp_path / "z")
    assert max(float(m.delta().abs().max()) for m in z.modules.values()) < 1e-6


def test_combine_refuses_different_bases(fx):
    a = read_peft(fx / "adapters" / "llama-patterns")
    q = read_peft(fx / "adapters" / "qwen3-dora")
    with pytest.raises(UnsupportedError, match="DoRA"):
        combine([a, q])
    from loratools.adapter import Adapter, LoraModule
    other = Adapter(modules={"model.layers.0.self_attn.q_proj": LoraModule(torch.zeros(2, 32), torch.zeros(32, 2), 1.0)})
    with pytest.raises(IncompatibleError, match="different bases"):
        combine([a, other])


# -- merge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,adapter", [("llama", "llama-patterns"), ("qwen2", "qwen2-bias"), ("qwen3", "qwen3-dora")])
def test_merged_checkpoint_equals_unmerged_and_loads_in_transformers(fx, tmp_path, arch, adapter):
    base = fx / "models" / arch
    a = api.load_adapter(fx / "adapters" / adapter, base=base)
    merge(base, [a], tmp_path / "m")
    ref = logits(base, [a])
    assert (logits(tmp_path / "m") - ref).abs().max() <= 1e-5
    assert (hf_logits(tmp_path / "m") - ref).abs().max() <= 1e-5
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_merge_tied_embeddings_with_embedding_lora_unties(fx, tmp_path):
    """An embedding LoRA alone changes the input side only: the merge unties. What extract writes on a
    tied model (the same delta on embed_tokens and lm_head) keeps the tie (tests/test_tied.py)."""
    base = fx / "models" / "qwen2"
    a, _ = extract(base, fx / "models" / "qwen2-tuned", None, RankRule("rank", 4))
    assert "model.embed_tokens" in a.modules and "lm_head" in a.modules
    assert merge(base, [a], tmp_path / "kept")["tied_embeddings"] == "kept"
    del a.modules["lm_head"]
    rep = merge(base, [a], tmp_path / "m")
    assert rep["untied_embeddings"] and rep["tied_embeddings"] == "untied"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert (hf_logits(tmp_path / "m") - logits(base, [a])).abs().max() <= 1e-5


def test_merge_two_weighted_adapters_bf16_sharded_and_unmerge(fx, tmp_path):
    base = fx / "models" / "llama"
    a, b = _pair(fx)
    merge(base, [a, b], tmp_path / "m", weights=[0.5, 1.0], max_shard_size="60KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    assert (logits(tmp_path / "m") - logits(base, [a, b], [0.5, 1.0])).abs().max() <= 1e-5
    merge(tmp_path / "m", [a, b], tmp_path / "u", weights=[0.5, 1.0], unmerge=True)
    with Checkpoint.open(base) as x, Checkpoint.open(tmp_path / "u") as y:
        for k in x.keys():
            assert torch.allclose(x.get(k), y.get(k), atol=1e-5), k
    merge(base, [a], tmp_path / "bf16", dtype=torch.bfloat16)
    with Checkpoint.open(tmp_path / "bf16") as y, Checkpoint.open(base) as x:
        k = "model.layers.0.self_attn.q_proj.weight"
        exact = (x.get(k).double() + a.modules[k[:-7]].delta().double()).to(torch.bfloat16)
        assert torch.equal(y.get(k), exact.to(torch.bfloat16)) or (y.get(k).float() - exact.float()).abs().max() <= 2 ** -8
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_merge_refusals(fx, tmp_path, run_cli):
    q = read_peft(fx / "adapters" / "qwen3-dora")
    with pytest.raises(UnsupportedError, match="DoRA"):
        merge(fx / "models" / "qwen3", [q], tmp_path / "u", unmerge=True)
    code, _, err = run_cli("merge", "--base", fx / "models" / "qwen3", "-a", fx / "adapters" / "llama-patterns", "-o", tmp_path / "x")
    assert code == 3 and "shape" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli("merge", "--base", fx / "models" / "llama", "-a", fx / "adapters" / "llama-patterns",
                           "-o", fx / "models" / "llama")
    assert code == 5 and "input" in err


def test_bf16_merge_rounds_once(fx, tmp_path):
    """Into a bf16 base: W' = round_bf16(W + s·B·A computed in fp32). Rounding once is checked
    against an fp64 ground truth; adding a bf16-rounded delta (rounding twice) is measurably worse."""
    base = fx / "models" / "llama-bf16-sharded"
    a = read_peft(fx / "adapters" / "llama-rslora")
    merge(base, [a], tmp_path / "m")
    once = twice = total = 0
    with Checkpoint.open(base) as x, Checkpoint.open(tmp_path / "m") as y:
        for name, m in a.modules.items():
            w = x.get(f"{name}.weight")
            got = y.get(f"{name}.weight")
            assert got.dtype == torch.bfloat16
            truth = (w.double() + m.delta(torch.float64)).to(torch.bfloat16)
            double_rounded = w + m.delta().to(torch.bfloat16)
            once += int((got == truth).sum())
            twice += int((double_rounded == truth).sum())
            total += truth.numel()
            ulp = (got.float() - truth.float()).abs() / truth.float().abs().clamp_min(1e-30)
            assert float(ulp.max()) <= 2 ** -7  # at most one bf16 ulp from the exact result
    assert once / total > 0.999 and twice / total < once / total - 0.01


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_rank_extract_then_merge_reproduces_the_tuned_weights(fx, tmp_path, arch):
    base, tuned = fx / "models" / arch, fx / "models" / f"{arch}-tuned"
    a, _ = extract(base, tuned, tmp_path / "a", RankRule("energy", 1.0), exact=True)
    merge(base, [read_peft(tmp_path / "a")], tmp_path / "m")
    with Checkpoint.open(tuned) as t, Checkpoint.open(tmp_path / "m") as m:
        for k in t.keys():
            if t.info(k).shape.__len__() == 2:
                assert torch.allclose(m.get(k), t.get(k), atol=2e-6), k
        if arch == "qwen2":  # tied: the head's change is carried too, by the same delta (the tie is kept)
            assert "lm_head.weight" not in m.keys()
            assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True


def test_partial_layer_adapter_round_trips_through_peft(fx, tmp_path):
    base = fx / "models" / "llama"
    full = read_peft(fx / "adapters" / "llama-rslora")
    from loratools.adapter import Adapter
    part = Adapter(modules={n: m for n, m in full.modules.items() if ".layers.1." in n}, config=dict(full.config))
    out = write_peft(part, tmp_path / "p", num_layers=2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert all(".layers.1." in t for t in cfg["target_modules"])
    assert (logits(base, [read_peft(out)]) - peft_logits(base, out)).abs().max() <= 1e-5
    assert (logits(base, [part]) - logits(base)).abs().max() > 0.1


def test_combine_warns_about_different_base_names(fx, run_cli, tmp_path):
    a, b = _pair(fx)
    a.config["base_model_name_or_path"], b.config["base_model_name_or_path"] = "org/model-a", "org/model-b"
    with pytest.warns(UserWarning, match="different base models"):
        combine([a, b])


def test_merge_refuses_a_weight_on_whole_tensor_replacements(fx, tmp_path):
    """modules_to_save replace base tensors whole: a weight other than 1 has no meaning there
    (it used to be ignored), and replaced tensors count as modified."""

    m = fx / "models" / "llama"
    a = api.load_adapter(fx / "adapters" / "llama-rslora", base=m)
    with Checkpoint.open(m) as ck:
        head = ck.get("lm_head.weight")
    a.modules_to_save = {"lm_head.weight": head + 0.01}
    with pytest.raises(IncompatibleError, match="cannot be weighted"):
        merge(m, [a], tmp_path / "w", weights=[0.5])
    assert not (tmp_path / "w").exists()
    rep = merge(m, [a], tmp_path / "ok")
    assert "lm_head.weight" in rep["modified"]
    with Checkpoint.open(tmp_path / "ok") as ck:
        assert torch.equal(ck.get("lm_head.weight"), (head + 0.01).to(ck.info("lm_head.weight").dtype))
