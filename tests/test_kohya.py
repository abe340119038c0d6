"""kohya format: round trips through PEFT and back keep every ΔW; names resolve with and without a base."""
import pytest
import torch

from loratools import api
from loratools.formats.kohya import read_kohya, write_kohya
from loratools.formats.peft import read_peft, write_peft
from loratools.models import load_model


def deltas(a):
    return {n: m.delta() for n, m in a.modules.items()}


def assert_same_deltas(a, b, tol=1e-6):
    da, db = deltas(a), deltas(b)
    assert da.keys() == db.keys()
    for k in da:
        assert torch.allclose(da[k], db[k], rtol=tol, atol=tol), k


def test_kohya_fixture_names_and_scales(fx):
    a = read_kohya(fx / "adapters" / "mistral-kohya.safetensors")
    assert "model.layers.1.self_attn.o_proj" in a.modules
    assert a.modules["model.layers.1.self_attn.o_proj"].rank == 2
    assert a.modules["model.layers.0.mlp.gate_proj"].scale == 2 / 4


def test_kohya_peft_kohya_round_trip(fx, tmp_path):
    k0 = read_kohya(fx / "adapters" / "mistral-kohya.safetensors")
    p = read_peft(write_peft(k0, tmp_path / "peft", num_layers=2))
    k1 = read_kohya(write_kohya(p, tmp_path / "back.safetensors"))
    assert_same_deltas(k0, p)
    assert_same_deltas(k0, k1)
    for n, m in k0.modules.items():  # factors unchanged, bit for bit
        assert torch.equal(m.A, k1.modules[n].A) and torch.equal(m.B, k1.modules[n].B)


def test_rslora_and_patterns_fold_into_kohya_alpha(fx, tmp_path):
    for name in ("llama-rslora",):
        p = read_peft(fx / "adapters" / name)
        k = read_kohya(write_kohya(p, tmp_path / f"{name}.safetensors"))
        assert_same_deltas(p, k)
        model = fx / "models" / "llama"
        ids = torch.arange(1, 30)[None]
        a, _ = load_model(model, adapters=[p])(ids)
        b, _ = load_model(model, adapters=[k])(ids)
        assert (a - b).abs().max().item() <= 1e-5


def test_kohya_refuses_what_it_cannot_hold(fx, tmp_path):
    from loratools.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="embedding LoRA"):
        write_kohya(read_peft(fx / "adapters" / "llama-patterns"), tmp_path / "x.safetensors")
    with pytest.raises(UnsupportedError, match="DoRA"):
        write_kohya(read_peft(fx / "adapters" / "qwen3-dora"), tmp_path / "y.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.iterdir())


def test_kohya_names_resolve_through_base(fx):
    a = api.load_adapter(fx / "adapters" / "mistral-kohya.safetensors", base=fx / "models" / "mistral")
    b = read_kohya(fx / "adapters" / "mistral-kohya.safetensors")
    assert a.modules.keys() == b.modules.keys()


def test_cli_convert_round_trip(fx, tmp_path, run_cli):
    code, out, err = run_cli("convert", fx / "adapters" / "mistral-kohya.safetensors", "--to", "peft",
                             "-o", tmp_path / "p", "--base", fx / "models" / "mistral")
    assert code == 0, err
    code, _, err = run_cli("convert", tmp_path / "p", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, err
    assert_same_deltas(read_kohya(fx / "adapters" / "mistral-kohya.safetensors"), read_kohya(tmp_path / "k.safetensors"))
    code, _, err = run_cli("convert", tmp_path / "p", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert code != 0 and "already exists" in err


def test_kohya_files_that_cannot_be_right_are_refused(fx, tmp_path):
    from loratools import st
    from loratools.errors import InputError, UnsupportedError
    from loratools.adapter import Adapter, LoraModule

    src = st.load_file(fx / "adapters" / "mistral-kohya.safetensors")
    key = next(k for k in sorted(src) if k.endswith(".lora_down.weight"))
    base = key[: -len(".lora_down.weight")]
    cases = {
        # the same layer under a second prefix: one set would silently win
        "dup": ({**src, **{k.replace("lora_unet_", "lora_te_", 1): v for k, v in src.items() if k.startswith(base)}},
                "second set of factors"),
        "int": ({**src, key: src[key].to(torch.int8)}, "floating point"),
        "rank0": ({**src, key: src[key][:0].contiguous(), base + ".lora_up.weight": src[base + ".lora_up.weight"][:, :0].contiguous()},
                  "rank 0"),
    }
    assert base.startswith("lora_unet_")
    for name, (sd, words) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        st.save_file(sd, p)
        with pytest.raises(InputError, match=words):
            read_kohya(p)
    huge = Adapter(modules={"model.layers.0.mlp.up_proj": LoraModule(A=torch.ones(2, 4), B=torch.ones(4, 2), scale=1e39)})
    with pytest.raises(UnsupportedError, match="finite float32 alpha"):
        write_kohya(huge, tmp_path / "huge.safetensors")
    assert not (tmp_path / "huge.safetensors").exists()
