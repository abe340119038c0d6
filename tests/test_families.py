"""Every family of the registry against transformers and PEFT, on fixtures transformers builds
(fixtures/families.py): reference logits (full, KV cache, padding), PEFT adapters both ways,
merge reloaded by transformers, extract, train. Parametrized over FIXTURES; every registry
family must have a fixture, so a new registry entry without one fails here. The reference-logit
tests (full, KV cache, padding) run the mixture-of-experts fixtures (MOE_FIXTURES) too; their other
paths are in tests/test_moe_*.py (expert LoRA needs PEFT's target_parameters)."""
import json
import math
import shutil

import pytest
import torch

from fixtures.families import FIXTURES, MOE_FIXTURES
from loratools import api
from loratools.arch import FAMILIES, load_config, parse_config
from loratools.checkpoint import Checkpoint
from loratools.errors import InputError, UnsupportedError
from loratools.models import load_model
from loratools.ops.extract import extract
from loratools.ops.factor import RankRule
from loratools.ops.merge import merge

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NAMES = list(FIXTURES)
WITH_MOE = NAMES + list(MOE_FIXTURES)
TOL = 1e-5
IDS = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))  # longer than every window
# every linear module of the text decoder, fused ones included; not a vision tower's
TEXT_LINEAR = (r"^(?!.*vision_tower).*\.(q_proj|k_proj|v_proj|qkv_proj|o_proj|gate_proj|up_proj|gate_up_proj|down_proj)$")


def fixture_dir(request, name):
    """The folder of fixture ``name`` in the session tree of its table."""
    return request.getfixturevalue("moe_families" if name in MOE_FIXTURES else "families") / name


def hf_model(d):
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(d, ids=IDS, **kw):
    with torch.no_grad():
        return hf_model(d)(ids, **kw).logits


def peft_logits(d, adapter_dir, ids=IDS):
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf_model(d), str(adapter_dir)).eval()(ids).logits


def peft_saved(d, out, seed=0, **cfg):
    """A PEFT adapter on every text linear module with non-zero random B, saved by PEFT."""
    torch.manual_seed(seed)
    conf = dict(r=4, lora_alpha=4, target_modules=TEXT_LINEAR, init_lora_weights=False)
    pm = peft.get_peft_model(hf_model(d), peft.LoraConfig(**{**conf, **cfg}))
    pm.save_pretrained(str(out))
    return out


def test_every_registry_family_has_a_fixture():
    assert set(FAMILIES) <= {f.family for f in [*FIXTURES.values(), *MOE_FIXTURES.values()]}


# -- reference decoder -------------------------------------------------------------------------
@pytest.mark.parametrize("name", WITH_MOE)
def test_logits_match_transformers(request, name):
    d = fixture_dir(request, name)
    ours, _ = load_model(d)(IDS)
    ref = hf_logits(d)
    assert ref.abs().max() > 1.0  # a non-trivial model
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", WITH_MOE)
def test_kv_cache_matches_transformers(request, name):
    """Prefill 10 tokens, then 14 single cached steps, against transformers' own cache (LongRoPE
    switches to its long factors mid-way, as transformers does per call)."""
    d = fixture_dir(request, name)
    ids = IDS[:1]
    model, hf = load_model(d), hf_model(d)
    ours, past = model(ids[:, :10])
    steps = [ours]
    with torch.no_grad():
        o = hf(ids[:, :10], use_cache=True)
        cache, refs = o.cache, [o.logits]
        for t in range(10, ids.shape[1]):
            lg, past = model(ids[:, t:t + 1], past=past)
            steps.append(lg)
            o = hf(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = o.cache
            refs.append(o.logits)
    assert (torch.cat(steps, 1) - torch.cat(refs, 1)).abs().max().item() <= TOL


@pytest.mark.parametrize("name", WITH_MOE)
def test_padding_mask_matches_transformers(request, name):
    d = fixture_dir(request, name)
    mask = torch.ones_like(IDS)
    mask[0, :5] = 0  # left padding in the first row
    ours, _ = load_model(d)(IDS, attention_mask=mask)
    ref = hf_logits(d, attention_mask=mask)
    keep = mask.bool()
    assert (ours[keep] - ref[keep]).abs().max().item() <= TOL


def test_features_act(families):
    """The fixtures exercise what they claim: soft-capping saturates, windows and NoPE matter."""
    from loratools.models import decoder

    seen, peak = [], []
    orig = decoder.softcap

    def spy(x, cap):
        seen.append(float((x.abs() > cap).float().mean()))
        peak.append(float(x.abs().max() / cap))
        return orig(x, cap)

    decoder.softcap = spy
    try:
        load_model(families / "gemma2")(IDS)
    finally:
        decoder.softcap = orig
    # 3 attention layers + the final logits: a share of the raw values beyond the cap (measured:
    # 18%, 21%, 14% of the scores, 5% of the logits), peaks well into tanh's flat part
    assert len(seen) == 4 and min(seen) > 0.02 and min(peak) > 1.5, (seen, peak)
    cfg = load_config(families / "smollm3")
    assert cfg.layer_ropes[3] is None and all(r is not None for r in cfg.layer_ropes[:3])
    assert load_config(families / "gemma2").layer_windows == (4, None, 4)
    assert load_config(families / "phi4_mini").rotary_dim == 12
    g3 = load_config(families / "gemma3")
    assert g3.family == "gemma3" and g3.layer_ropes[0].theta == 10000.0 and g3.layer_ropes[2].rope_type == "linear"


# -- PEFT both ways, merge -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_peft_adapter_both_ways(families, tmp_path, name):
    d = families / name
    out = peft_saved(d, tmp_path / "peft")
    ref = peft_logits(d, out)
    a = api.load_adapter(out, base=d)
    fused = [n for n in a.modules if n.endswith(("qkv_proj", "gate_up_proj"))]
    assert bool(fused) == FIXTURES[name].family.startswith("phi3")
    ours, _ = load_model(d, adapters=[a])(IDS)
    base, _ = load_model(d)(IDS)
    assert (ref - base).abs().max() > 1e-3
    assert (ours - ref).abs().max().item() <= TOL
    # loratools writes it; PEFT loads it with the same result
    again = api.save_adapter(a, tmp_path / "ours", num_layers=load_config(d).num_hidden_layers)
    assert (peft_logits(d, again) - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_merge_reloads_in_transformers(families, tmp_path, name):
    d = families / name
    out = peft_saved(d, tmp_path / "peft", seed=1)
    ref = peft_logits(d, out)
    merge(d, [api.load_adapter(out, base=d)], tmp_path / "merged")
    assert (hf_logits(tmp_path / "merged") - ref).abs().max().item() <= TOL


# -- extract ---------------------------------------------------------------------------------------
def _tuned(families, tmp_path, name, rank=6):
    """base + a decaying-spectrum delta on every 2-D text weight, made and saved by transformers."""
    d = families / name
    m = hf_model(d)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in m.named_parameters():
            if p.dim() != 2 or "vision_tower" in pname or "embed" in pname or "lm_head" in pname:
                continue
            o, i = p.shape
            decay = torch.tensor([0.3 / (k + 1) for k in range(rank)])
            head = (torch.randn(o, rank, generator=g) / math.sqrt(o)) @ torch.diag(decay) @ (torch.randn(rank, i, generator=g) / math.sqrt(i))
            p.add_(head * float(p.norm()) / math.sqrt(o * i) * math.sqrt(min(o, i)) + 2e-3 * torch.randn(o, i, generator=g) * float(p.std()))
    out = tmp_path / f"{name}-tuned"
    m.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(d / f, out / f)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_extract_error_is_optimal(families, tmp_path, name):
    d = families / name
    tuned = _tuned(families, tmp_path, name)
    a, rep = extract(d, tuned, None, RankRule("rank", 4), exact=True, embeddings="skip")
    assert a.modules
    with Checkpoint.open(d) as b, Checkpoint.open(tuned) as t:
        for mod, m in a.modules.items():
            key = f"{mod}.weight"
            ref = t.get(key).double() - b.get(key).double()
            err = float((m.delta().double() - ref).norm() / ref.norm())
            S = torch.linalg.svdvals(ref)
            opt = math.sqrt(float(S[4:].pow(2).sum() / S.pow(2).sum()))
            assert m.rank == 4 and err <= opt * (1 + 1e-6), mod
    # every linear module of the text decoder but the head (Gemma 4: its per-layer input ones too)
    from loratools.models.decoder import DecoderLM, Linear

    with torch.device("meta"):
        mods = DecoderLM(load_config(d)).linear_modules()
    expected = {n.rsplit(".", 1)[1] for n, m in mods.items() if isinstance(m, Linear) and n != "lm_head"}
    assert {n.rsplit(".", 1)[1] for n in a.modules} == expected
    # written as PEFT, it loads in PEFT on the base with the logits of our unmerged forward
    out = tmp_path / "extracted"
    a, _ = extract(d, tuned, out, RankRule("rank", 4), exact=True, embeddings="skip")
    ours, _ = load_model(d, adapters=[api.load_adapter(out, base=d)])(IDS)
    assert (ours - peft_logits(d, out)).abs().max().item() <= TOL


# -- train -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_train_a_few_steps(families, tmp_path, name):
    from loratools.formats.peft import read_peft
    from loratools.train.loop import TrainConfig, train

    words = ["apple", "river", "stone", "cloud"]
    tr = tmp_path / "train.jsonl"
    tr.write_text("".join(json.dumps({"prompt": f"Code for {w}:", "completion": f" {100 + 37 * i}"}) + "\n"
                          for _ in range(4) for i, w in enumerate(words)))
    d = families / name
    cfg = TrainConfig(rank=4, alpha=8, seq_len=32, batch_size=4, epochs=2, lr=1e-2, warmup=1, eval_every=1000,
                      checkpoint_every=1000, device="cpu")
    rep = train(d, tr, tmp_path / "out", cfg, log=lambda m: None)
    losses = [l for _, l in rep["losses"]] if isinstance(rep["losses"][0], (list, tuple)) else rep["losses"]
    assert all(math.isfinite(l) for l in losses) and losses[-1] < losses[0], losses
    a = read_peft(tmp_path / "out")
    assert {n.rsplit(".", 1)[1] for n in a.modules} == set(load_config(d).linear_shapes())
    ours, _ = load_model(d, adapters=[a])(IDS)
    assert (ours - peft_logits(d, tmp_path / "out")).abs().max().item() <= TOL


# -- config generations and layouts ---------------------------------------------------------------
def test_gemma3_transformers4_config_and_both_layouts(families, tmp_path):
    """A 4.x Gemma 3 config (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
    and the in-memory layout on disk (model.language_model.*) give the same model."""
    from loratools import st

    src = families / "gemma3_text"
    ref, _ = load_model(src)(IDS)
    d4 = tmp_path / "g3-4x"
    shutil.copytree(src, d4)
    cfg = json.loads((d4 / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    full = dict(rp["full_attention"])
    cfg.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=rp["sliding_attention"]["rope_theta"],
               rope_scaling={"rope_type": full.pop("rope_type"), **full}, sliding_window_pattern=3)
    (d4 / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(load_model(d4)(IDS)[0], ref)  # pattern 3 over 4 layers: local, local, global, local
    assert (hf_logits(d4) - ref).abs().max().item() <= TOL
    # the multimodal checkpoint with its text under model.language_model.* (as transformers 5 holds it)
    mm = families / "gemma3"
    dm = tmp_path / "g3-mm"
    shutil.copytree(mm, dm)
    sd = st.load_file(dm / "model.safetensors")
    sd = {("model.language_model." + k[len("language_model.model."):]) if k.startswith("language_model.model.") else k: v
          for k, v in sd.items()}
    st.save_file(sd, dm / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(load_model(dm)(IDS)[0], load_model(mm)(IDS)[0])


# -- bad input -----------------------------------------------------------------------------------
def edited_copy(families, tmp_path, name, edit, tag="bad"):
    """A copy of fixture ``name`` whose config.json ``edit`` (a function of the dict) changed."""
    d = tmp_path / f"{name}-{tag}"
    shutil.copytree(families / name, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


CONTRADICTIONS = {
    "sliding layer without window": ("gemma2", lambda c: c.update(sliding_window=None), "sliding_window"),
    "odd rotary dim": ("phi4_mini", lambda c: (c.update(partial_rotary_factor=0.5625),
                                               c["rope_parameters"].update(partial_rotary_factor=0.5625)), "odd rotary"),
    "longrope factors vs rotary dim": ("phi3", lambda c: c["rope_parameters"].update(short_factor=[1.0] * 5), "short_factor"),
    "no rope for a layer type": ("gemma3_text", lambda c: c["rope_parameters"].pop("sliding_attention"), "sliding_attention"),
    "nope list length": ("smollm3", lambda c: c.update(no_rope_layers=[1, 0]), "no_rope_layers"),
    "layer_types length": ("gemma2", lambda c: c.update(layer_types=["full_attention"]), "layer_types"),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradicting_config_is_refused_in_one_line(families, tmp_path, case):
    name, edit, word = CONTRADICTIONS[case]
    d = edited_copy(families, tmp_path, name, edit)
    with pytest.raises(InputError) as e:
        load_model(d)
    msg = str(e.value)
    assert "config.json" in msg and word in msg and "\n" not in msg


def test_unknown_family_is_named_in_one_line(families, tmp_path):
    d = edited_copy(families, tmp_path, "llama", lambda c: c.update(model_type="my_decoder"))
    with pytest.raises(UnsupportedError) as e:
        load_model(d)
    msg = str(e.value)
    assert "my_decoder" in msg and "config.json" in msg and "\n" not in msg


def test_both_config_generations_read_alike():
    """Every family: a 4.x-style config (top-level rope_theta / rope_scaling) and the same values
    as transformers 5 rope_parameters resolve to the same rope."""
    for name, fx in FIXTURES.items():
        if fx.text_config is not None or "rope_parameters" not in fx.config:
            continue
        rp = dict(fx.config["rope_parameters"])
        if any(isinstance(v, dict) for v in rp.values()):
            continue
        base = {"model_type": fx.family, "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
                "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256,
                **{k: v for k, v in fx.config.items() if k not in ("rope_parameters", "layer_types")}}
        theta = rp.pop("rope_theta")
        new = parse_config({**base, "rope_parameters": {**rp, "rope_theta": theta}})
        old = parse_config({**base, "rope_theta": theta, **({"rope_scaling": rp} if rp.get("rope_type") != "default" else {})})
        assert new.layer_ropes == old.layer_ropes, name


def test_fused_and_split_layouts_refused_in_one_line(families, tmp_path):
    """A split checkpoint labelled phi3 (fused family), and a fused adapter on a split model (and
    the reverse): one line each, naming what disagrees."""
    from loratools import st
    from loratools.errors import IncompatibleError

    d = tmp_path / "phi3-split"
    shutil.copytree(families / "phi3", d)
    sd = st.load_file(d / "model.safetensors")
    for k in [k for k in sd if k.endswith("qkv_proj.weight")]:
        q, kk, v = sd.pop(k).split([64, 32, 32])
        for leaf, t in (("q_proj", q), ("k_proj", kk), ("v_proj", v)):
            sd[k.replace("qkv_proj", leaf)] = t
    st.save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompatibleError) as e:
        load_model(d)
    assert "split projection" in str(e.value) and "qkv_proj" in str(e.value) and "\n" not in str(e.value)
    fused = api.load_adapter(peft_saved(families / "phi3", tmp_path / "fused"))
    split = api.load_adapter(peft_saved(families / "llama", tmp_path / "split"))
    for base, a in ((families / "llama", fused), (families / "phi3", split)):
        with pytest.raises(IncompatibleError) as e:
            load_model(base, adapters=[a])
        assert "does not have" in str(e.value) and "\n" not in str(e.value)
