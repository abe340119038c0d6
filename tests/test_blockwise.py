"""Block-at-a-time paths give the bytes of the one-shot computation: GGUF export written a block of
rows at a time, the extract delta built a block of rows at a time (and in the transposed layout)."""
import hashlib

import pytest
import torch

from loratools import api
from loratools.checkpoint import Checkpoint
from loratools.formats import gguf_model
from loratools.formats.gguf_model import export_gguf
from loratools.ops import factor
from loratools.ops.common import delta_sq, sum_sq


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("model,adapter", [("qwen2", None), ("llama", "llama-rslora")])
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_row_blocks_same_bytes(fx, tmp_path, monkeypatch, model, adapter, outtype):
    src = fx / "models" / model
    ads = [api.load_adapter(fx / "adapters" / adapter, base=src)] if adapter else []
    export_gguf(src, tmp_path / "whole.gguf", ads, outtype=outtype)
    with Checkpoint.open(src) as ck:
        widest = max(ck.info(n).shape[-1] for n in ck.keys() if len(ck.info(n).shape) == 2)
        rows = max(ck.info(n).shape[0] for n in ck.keys() if len(ck.info(n).shape) == 2)
    monkeypatch.setattr(gguf_model, "BLOCK_BYTES", 3 * 4 * widest)  # 3 rows of the widest tensor a block
    assert rows > 3 * 4  # tensors of many blocks, the last one partial for most shapes
    export_gguf(src, tmp_path / "blocks.gguf", ads, outtype=outtype)
    assert _sha(tmp_path / "blocks.gguf") == _sha(tmp_path / "whole.gguf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_delta_blocks_same_bits(dtype):
    g = torch.Generator().manual_seed(0)
    wb = torch.randn(3001, 96, generator=g).to(dtype)
    wt = (wb.float() + 0.01 * torch.randn(3001, 96, generator=g)).to(dtype)
    want = wt.to(torch.float32, copy=True)
    want -= wb  # the one-shot form
    for transposed in (False, True):
        d, e = delta_sq(wb, wt, "cpu", transposed=transposed, chunk=1000)
        assert torch.equal(d, want) and d.shape == want.shape
        assert e == sum_sq(want, chunk=1000)
        assert d.T.is_contiguous() == transposed
    for shape in ((5000,), (7, 3, 50), ()):  # 1-D (norms, biases), more dims, a scalar
        a, b = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
        w = b.to(torch.float32, copy=True)
        w -= a
        d, e = delta_sq(a, b, "cpu", chunk=1000)
        assert torch.equal(d, w) and e == sum_sq(w, chunk=1000)


@pytest.mark.parametrize("rule", [factor.RankRule("rank", 8), factor.RankRule("energy", 0.5)])
def test_factorize_transposed_layout_same_bits(rule):
    """The embedding is factored as ΔWᵀ: from a contiguous ΔWᵀ the factors are the ones from a
    transposed view of ΔW (the randomized path included)."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(4000, 128, generator=g) @ torch.diag(torch.logspace(0, -3, 128))
    view, contig = d.T, d.T.contiguous()
    r0, r1 = factor.factorize(view, rule), factor.factorize(contig, rule)
    for a, b in zip(r0[:3], r1[:3]):
        assert torch.equal(a, b)
    assert r0[3]["method"] == r1[3]["method"]
