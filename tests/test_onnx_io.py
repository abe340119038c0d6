"""ONNX export at the I/O limit (issue 16): the fast path (``onnx_model.FAST``: while tracing, no
product with a placeholder weight is computed and shape inference is not given the placeholder
weights) writes the same bytes as the plain path kept beside it — model.onnx, model.onnx_data and
the copied files — on the fixture models (every family, mixture-of-experts included), with and
without an adapter, fp32 and fp16, with LoRA slots, without cache, inline and external data; and
ONNX Runtime runs what it wrote."""
import numpy as np
import pytest
import torch

from fixtures.families import FIXTURES, MOE_FIXTURES
from loratools import api
from loratools.formats import onnx_model
from loratools.models import load_model
from loratools.runtimes.onnxruntime import Runner

IDS = [int(x) for x in torch.randint(3, 380, (14,), generator=torch.Generator().manual_seed(9))]


def _both(monkeypatch, tmp_path, model, **kw):
    """Export ``model`` with the plain path and the fast one; assert every output file is the same bytes."""
    outs = {}
    for fast in (False, True):
        monkeypatch.setattr(onnx_model, "FAST", fast)
        outs[fast] = tmp_path / ("fast" if fast else "plain")
        onnx_model.export_onnx(model, outs[fast], **kw)
    names = sorted(p.name for p in outs[False].iterdir())
    assert names == sorted(p.name for p in outs[True].iterdir())
    assert "model.onnx" in names
    for n in names:
        same = (outs[False] / n).read_bytes() == (outs[True] / n).read_bytes()  # (no diff of the bytes in a failure)
        assert same, n
    return outs[True]


@pytest.mark.parametrize("case", ["adapter-fp32", "adapter-fp16", "slots-fp16", "no-cache", "external-data"])
def test_fast_export_same_bytes_and_runs(fx, monkeypatch, tmp_path, case):
    m = fx / "models" / ("qwen3" if case == "slots-fp16" else "llama")
    kw = {}
    if case != "slots-fp16":
        kw["adapters"] = [api.load_adapter(fx / "adapters" / "llama-rslora", base=m)]
    if case.endswith("fp16"):
        kw["dtype"] = "fp16"
    if case == "slots-fp16":
        kw["lora_slots"] = "all-linear"
    if case == "no-cache":
        kw["cache"] = False
    if case == "external-data":
        kw["external_data_over"] = 0
    out = _both(monkeypatch, tmp_path, m, **kw)
    assert (out / "model.onnx_data").exists() == (case == "external-data")
    logits = Runner(out).run(IDS)[0]
    want = load_model(m, adapters=kw.get("adapters", []))(torch.tensor([IDS]))[0][0].numpy()
    if kw.get("dtype") == "fp16":
        assert (logits.argmax(-1) == want.argmax(-1)).mean() >= 0.9
        assert np.abs(logits - want).max() <= 0.05 * np.abs(want).max()
    else:
        assert np.abs(logits - want).max() <= 1e-4


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fast_export_same_bytes_every_family(families, monkeypatch, tmp_path, name):
    _both(monkeypatch, tmp_path, families / name)


@pytest.mark.parametrize("name", list(MOE_FIXTURES))
def test_fast_export_same_bytes_moe(moe_families, monkeypatch, tmp_path, name):
    _both(monkeypatch, tmp_path, moe_families / name, lora_slots="all-linear", dtype="fp16")


@pytest.mark.parametrize("block", [1000, 3000])
def test_fast_export_same_bytes_in_row_blocks(fx, monkeypatch, tmp_path, block):
    """Small blocks so that the fixture's tensors take every blocked path: merged rows in several
    blocks (block 1000: written as column segments of the transposed rows; 3000: assembled whole),
    unchanged tensors converted a few rows at a time."""
    from loratools.ops import merge

    monkeypatch.setattr(merge, "BLOCK_ELEMS", block)
    monkeypatch.setattr(merge, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(onnx_model, "COPY_BLOCK_ELEMS", block)
    m = fx / "models" / "llama"
    a = api.load_adapter(fx / "adapters" / "llama-rslora", base=m)
    assert len(merge.row_blocks(*a.modules[next(iter(a.modules))].B.shape[:1], 64)) > 1
    _both(monkeypatch, tmp_path, m, adapters=[a], dtype="fp16", external_data_over=0)
