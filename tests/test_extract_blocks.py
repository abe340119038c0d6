"""extract's vocabulary-sized deltas in row blocks (factor.DeltaBlocks): never whole in memory, the
factorization agrees with the one-shot SVD of the whole delta to stated tolerances (singular values
1e-5 relative, B·A 1e-5 relative Frobenius, the same chosen rank), in both orientations (the head as
ΔW, the embedding as ΔWᵀ), for the randomized path and the exact one (float64 Gram matrix)."""
import pytest
import torch

from loratools.ops import extract as extract_mod
from loratools.ops import factor
from loratools.ops.extract import extract
from loratools.ops.factor import DeltaBlocks, RankRule


def _known_spectrum(rows=3001, cols=96, dtype=torch.float32, seed=0):
    """(wb, wt, ΔW, σ) with ΔW = U diag(σ) Vᵀ, σ from 1 down to 1e-2 (a vocabulary-shaped delta, small hidden)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -2, cols, dtype=torch.float64)
    d = (U * s) @ V.T
    wb = torch.randn(rows, cols, generator=g).to(dtype)
    wt = (wb.double() + d).to(dtype)
    return wb, wt, wt.float() - wb.float(), s


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("transposed", [False, True])
def test_blocks_products_and_energy(monkeypatch, transposed):
    monkeypatch.setattr(factor, "BLOCK_BYTES", 4 * 96 * 250)  # 250 rows a block: 13 blocks, the last partial
    wb, wt, d, _ = _known_spectrum(dtype=torch.bfloat16)
    M = DeltaBlocks(wb, wt, "cpu", transposed=transposed)
    want = d.T if transposed else d
    assert M.shape == want.shape
    assert sum(1 for _ in M.blocks()) == 13
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(want.shape[1], 7, generator=g), torch.randn(want.shape[0], 7, generator=g)
    assert _rel(M.mm(X), want @ X) < 1e-6
    assert _rel(M.rmm(Y), want.T @ Y) < 1e-6
    assert abs(M.sum_sq() - float(d.double().pow(2).sum())) <= 1e-12 * M.sum_sq()
    assert _rel(M.gram(), d.double().T @ d.double()) < 1e-12


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rule,exact", [(RankRule("rank", 8), False), (RankRule("energy", 0.9), False),
                                        (RankRule("rank", 8), True), (RankRule("energy", 0.99), True),
                                        (RankRule("ratio", 20), True)])
def test_blocked_factorize_matches_direct(monkeypatch, transposed, rule, exact):
    monkeypatch.setattr(factor, "BLOCK_BYTES", 4 * 96 * 250)
    wb, wt, d, s = _known_spectrum()
    whole = d.T.contiguous() if transposed else d
    B0, A0, S0, i0 = factor.factorize(whole, rule, exact=exact, start_rank=8)
    B1, A1, S1, i1 = factor.factorize(DeltaBlocks(wb, wt, "cpu", transposed), rule, exact=exact, start_rank=8)
    assert i1["rank"] == i0["rank"] > 0 and i1["method"] == i0["method"] and i1.get("row_blocks")
    assert B1.shape == B0.shape and A1.shape == A0.shape
    assert float(((S1.double() - S0.double()).abs() / S0.double()).max()) < 1e-5
    assert _rel(B1 @ A1, B0 @ A0) < 1e-5
    assert abs(i1["energy"] - i0["energy"]) < 1e-6
    if exact:  # the whole spectrum, against the known one
        k = i0["rank"]
        assert float(((i1["spectrum"][:k].double() - s[:k]).abs() / s[:k]).max()) < 1e-5
        assert float(((factor.svdvals(DeltaBlocks(wb, wt, "cpu", transposed)).double() - s).abs() / s).max()) < 1e-5


def test_blocked_exact_keeps_only_the_chosen_vectors():
    wb, wt, d, _ = _known_spectrum()
    U, S, Vh = factor.svd_gram(DeltaBlocks(wb, wt, "cpu"), rank=5)
    assert U.shape == (3001, 5) and Vh.shape == (5, 96) and S.numel() == 96
    U0, S0, Vh0 = torch.linalg.svd(d.double(), full_matrices=False)
    assert _rel((U * S[:5]) @ Vh, (U0[:, :5] * S0[:5]) @ Vh0[:5]) < 1e-5


def test_extract_row_blocks_match_whole(fx, tmp_path, monkeypatch):
    """End to end: the embedding and head (in row blocks once over the threshold) give the adapter of
    the whole-delta path to 1e-5 with the same ranks; the modules under the threshold the same bytes."""
    from loratools import api
    from loratools.checkpoint import Checkpoint

    base, tuned = fx / "models" / "llama", fx / "models" / "llama-tuned"
    a0, r0 = extract(base, tuned, None, RankRule("rank", 4))
    with Checkpoint.open(base) as ck:
        vocab_bytes = 4 * ck.info("model.embed_tokens.weight").numel
    monkeypatch.setattr(extract_mod, "BLOCKED_MIN_BYTES", vocab_bytes - 1)
    monkeypatch.setattr(factor, "BLOCK_BYTES", vocab_bytes // 7)
    a1, r1 = extract(base, tuned, tmp_path / "ex", RankRule("rank", 4))
    entries = {**r1["modules"], **r1["embeddings"]}
    blocked = {m for m, v in entries.items() if v.get("row_blocks")}
    assert {"model.embed_tokens", "lm_head"} <= blocked
    assert set(a1.modules) == set(a0.modules) and r1["ranks"] == r0["ranks"]
    for name, m0 in a0.modules.items():
        m1 = a1.modules[name]
        if name in blocked:
            assert m1.kind == m0.kind and m1.A.shape == m0.A.shape and m1.B.shape == m0.B.shape
            assert _rel(m1.B @ m1.A, m0.B @ m0.A) < 1e-5
        else:
            assert torch.equal(m1.A, m0.A) and torch.equal(m1.B, m0.B)
    assert abs(r1["total_delta_energy"] - r0["total_delta_energy"]) <= 1e-12 * r0["total_delta_energy"]
    # the written adapter is PEFT's embedding orientation (A: r × vocab), read back by PEFT's layout
    back = api.load_adapter(tmp_path / "ex", base=base)
    e0, e1 = a0.modules["model.embed_tokens"], back.modules["model.embed_tokens"]
    assert _rel(e1.B.float() @ e1.A.float(), e0.B @ e0.A) < 1e-5
