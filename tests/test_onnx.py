"""ONNX export validated in ONNX Runtime: logits and KV cache against the torch reference,
greedy generation with and without cache, LoRA slots with .onnx_adapter files."""

import numpy as np
import pytest
import torch

from loratools import api
from loratools.errors import UnsupportedError
from loratools.formats.onnx_model import export_onnx, export_onnx_adapter
from loratools.models import load_model
from loratools.runtimes.onnxruntime import Runner

IDS = [int(x) for x in torch.randint(3, 380, (14,), generator=torch.Generator().manual_seed(9))]


def ref(model_dir, adapters=(), ids=IDS):
    logits, presents = load_model(model_dir, adapters=list(adapters))(torch.tensor([ids]))
    return logits[0].numpy(), presents


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_fp32_logits_and_kv_match_reference(fx, onnx_dir, arch):
    import onnx
    out = onnx_dir / arch
    export_onnx(fx / "models" / arch, out)
    onnx.checker.check_model(str(out / "model.onnx"))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    r = Runner(out)
    assert r.provider == "CPUExecutionProvider"
    names = [i.name for i in r.sess.get_inputs()]
    assert names[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    logits, present = r.run(IDS)
    want, pres = ref(fx / "models" / arch)
    assert np.abs(logits - want).max() <= 1e-4
    for i, (k, v) in enumerate(pres):
        assert np.abs(present[f"past_key_values.{i}.key"][0] - k[0].numpy()).max() <= 1e-4
        assert np.abs(present[f"past_key_values.{i}.value"][0] - v[0].numpy()).max() <= 1e-4
    # decode one token at a time with the cache (sequence length 1, past > 0)
    step, past = r.run(IDS[:9])
    for t in range(9, len(IDS)):
        lg, past = r.run([IDS[t]], past, t)
        assert np.abs(lg[-1] - want[t]).max() <= 1e-4
    assert r.greedy(IDS, 8, cache=True) == r.greedy(IDS, 8, cache=False)


def test_no_cache_export_and_fp16(fx, onnx_dir):
    m = fx / "models" / "qwen3"
    export_onnx(m, onnx_dir / "nocache", cache=False)
    r = Runner(onnx_dir / "nocache")
    assert r.layers == 0 and len(r.sess.get_outputs()) == 1
    want, _ = ref(m)
    assert np.abs(r.run(IDS)[0] - want).max() <= 1e-4
    export_onnx(m, onnx_dir / "fp16", dtype="fp16")
    got = Runner(onnx_dir / "fp16").run(IDS)[0]
    # measured: max |Δ| ≈ 1e-2 on logits of magnitude ~10; top-1 identical
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_merged_export_and_lora_slots_with_onnx_adapters(fx, onnx_dir, tmp_path, run_cli):
    m = fx / "models" / "llama"
    slots = onnx_dir / "slots"
    code, out, err = run_cli("export", "onnx", m, "--lora-slots", "all-linear", "-o", slots)
    assert code == 0, err
    base_want, _ = ref(m)
    assert np.abs(Runner(slots).run(IDS)[0] - base_want).max() <= 1e-4  # nothing fed: the base model
    for name in ("llama-rslora", "llama-patterns"):
        a = api.load_adapter(fx / "adapters" / name, base=m)
        if name == "llama-patterns":  # embedding LoRA has no slot: refused, then dropped for this test
            with pytest.raises(UnsupportedError, match="no LoRA slot"):
                export_onnx_adapter(a, tmp_path / "x.onnx_adapter")
            a.modules.pop("model.embed_tokens")
        ad = tmp_path / f"{name}.onnx_adapter"
        export_onnx_adapter(a, ad)
        merged = tmp_path / f"{name}-merged"
        export_onnx(m, merged, [a])
        want, _ = ref(m, [a])
        switched = Runner(slots, adapter=ad).run(IDS)[0]
        assert np.abs(switched - want).max() <= 1e-4
        assert np.abs(switched - Runner(merged).run(IDS)[0]).max() <= 1e-4
        assert np.abs(switched - base_want).max() > 0.1
    code, _, err = run_cli("export", "onnx-adapter", fx / "adapters" / "llama-rslora", "-o", tmp_path / "c.onnx_adapter",
                           "--model", slots)
    assert code == 0, err


def test_adapter_that_does_not_fit_the_slots_is_refused(fx, onnx_dir, tmp_path, run_cli):
    m = fx / "models" / "llama"
    slots = onnx_dir / "qv-slots"
    export_onnx(m, slots, lora_slots="q_proj,v_proj")
    code, _, err = run_cli("export", "onnx-adapter", fx / "adapters" / "llama-rslora", "-o", tmp_path / "a.onnx_adapter",
                           "--model", slots)
    assert code == 3 and "matches no LoRA slot" in err and not (tmp_path / "a.onnx_adapter").exists()
    q = api.load_adapter(fx / "adapters" / "qwen3-dora")
    with pytest.raises(UnsupportedError, match="DoRA"):
        export_onnx_adapter(q, tmp_path / "d.onnx_adapter")


def test_external_data_layout_checks_by_path_and_runs(fx, tmp_path):
    """Models over 2 GB go to model.onnx + model.onnx_data; the same path, forced on a small model."""
    m = fx / "models" / "qwen2"
    rep = export_onnx(m, tmp_path / "ext", external_data_over=0)
    assert rep["external_data"] and (tmp_path / "ext" / "model.onnx_data").stat().st_size > 100_000
    assert (tmp_path / "ext" / "model.onnx").stat().st_size < 200_000
    want, _ = ref(m)
    assert np.abs(Runner(tmp_path / "ext").run(IDS)[0] - want).max() <= 1e-4


def test_cuda_provider_when_present(fx, onnx_dir):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider on this machine")
    out = onnx_dir / "cuda"
    export_onnx(fx / "models" / "llama", out)
    r = Runner(out, device="cuda")
    assert r.provider == "CUDAExecutionProvider"
    want, _ = ref(fx / "models" / "llama")
    assert np.abs(r.run(IDS)[0] - want).max() <= 1e-3


def test_streamed_export_keeps_ties_and_unties_when_an_adapter_changes_one_side(fx, tmp_path):
    """The export traces a weightless model and writes each weight once: a tied embedding is one
    initializer (gather table and head); an adapter on the embedding alone unties them."""
    import onnx

    from loratools.adapter import Adapter, LoraModule

    m = fx / "models" / "qwen2"  # tied, q/k/v biases
    vocab, hidden = load_model(m).model.embed_tokens.weight.shape

    def vocab_sized(d):
        g = onnx.load(str(d / "model.onnx")).graph
        assert not [i.name for i in g.input if i.name.startswith("model.")]  # weights are initializers
        return [t.name for t in g.initializer if sorted(t.dims) == sorted([vocab, hidden])]

    export_onnx(m, tmp_path / "tied")
    assert np.abs(Runner(tmp_path / "tied").run(IDS)[0] - ref(m)[0]).max() <= 1e-4
    assert len(vocab_sized(tmp_path / "tied")) == 1
    g = torch.Generator().manual_seed(3)
    emb = LoraModule(A=torch.randn(4, vocab, generator=g), B=torch.randn(hidden, 4, generator=g) * 0.1, scale=2.0,
                     kind="embedding")
    a = Adapter(modules={"model.embed_tokens": emb}, format="peft")
    export_onnx(m, tmp_path / "untied", [a])
    want = ref(m, [a])[0]
    assert np.abs(Runner(tmp_path / "untied").run(IDS)[0] - want).max() <= 1e-4
    assert np.abs(want - ref(m)[0]).max() > 0.1 and len(vocab_sized(tmp_path / "untied")) == 2
