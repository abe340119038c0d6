"""Factorizations and rank rules against dense ground truth (fp64)."""
import math

import pytest
import torch

from loratools.errors import LoratoolsError
from loratools.ops import factor
from loratools.ops.factor import RankRule


def slow_spectrum(m=400, n=300, seed=0, power=0.5):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.tensor([1.0 / (i + 1) ** power for i in range(k)], dtype=torch.float64)
    return (U[:, :k] * S) @ V[:, :k].T


def optimal_error(M, k):
    S = torch.linalg.svdvals(M.double())
    return math.sqrt(float(S[k:].pow(2).sum() / S.pow(2).sum()))


def rel(M, B, A):
    return float((M.double() - B.double() @ A.double()).norm() / M.double().norm())


@pytest.mark.parametrize("k", [8, 32])
def test_randomized_within_one_percent_of_optimal_on_a_flat_spectrum(k):
    M = slow_spectrum().float()
    B, A, S, info = factor.factorize(M, RankRule("rank", k))
    assert info["method"] == "randomized" and info["rank"] == k
    err, opt = rel(M, B, A), optimal_error(M, k)
    assert err <= opt * 1.01
    assert abs(info["rel_error"] - err) < 1e-4  # the report's error is the true error


def test_exact_matches_optimal_to_1e6():
    M = slow_spectrum(200, 150).float()
    B, A, _, info = factor.factorize(M, RankRule("rank", 20), exact=True)
    assert abs(rel(M, B, A) - optimal_error(M, 20)) / optimal_error(M, 20) <= 1e-6


def test_full_rank_reconstructs_to_roundoff():
    M = slow_spectrum(96, 64).float()
    B, A, _, info = factor.factorize(M, RankRule("energy", 1.0), exact=True)
    assert info["rank"] == 64 and rel(M, B, A) < 1e-6


def test_sqrt_split_balances_factors():
    M = slow_spectrum(64, 48).float()
    B, A, S, _ = factor.factorize(M, RankRule("rank", 5), exact=True)
    assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-4)
    assert torch.allclose(B.norm(dim=0) ** 2, S, rtol=1e-4)


def test_rank_rules():
    S = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    e = S.pow(2)
    assert factor.choose_rank(S, RankRule("rank", 2)) == 2
    # cumulative energy: 16/21.25 = 0.753, 20/21.25 = 0.941, 21/21.25 = 0.988
    assert float(e[:1].sum() / e.sum()) < 0.8
    assert factor.choose_rank(S, RankRule("energy", 0.75)) == 1
    assert factor.choose_rank(S, RankRule("energy", 0.8)) == 2
    assert factor.choose_rank(S, RankRule("energy", 0.95)) == 3
    assert factor.choose_rank(S, RankRule("fro", math.sqrt(20 / 21.25))) == 2
    assert factor.choose_rank(S, RankRule("ratio", 4)) == 3  # σ ≥ 1
    assert factor.choose_rank(S, RankRule("threshold", 1.5)) == 2
    assert factor.choose_rank(S, RankRule("energy", 1.0, max_rank=2)) == 2


def test_energy_rule_uses_total_energy_of_truncated_spectrum():
    S = torch.tensor([3.0, 1.0])
    # the visible head holds 10 of 20 units of energy: 0.9 can't be reached within it
    assert factor.choose_rank(S, RankRule("energy", 0.9), total_energy=20.0) == 3


def test_randomized_energy_rule_grows_its_sketch():
    M = slow_spectrum(600, 500, power=0.3).float()
    B, A, _, info = factor.factorize(M, RankRule("energy", 0.5))
    _, _, _, exact = factor.factorize(M, RankRule("energy", 0.5), exact=True)
    assert info["rank"] == exact["rank"] and info["rank"] > 64


def test_svd_factored_equals_dense():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(300, 12, generator=g), torch.randn(12, 200, generator=g)
    U, S, Vh = factor.svd_factored(B, A, 0.7)
    dense = torch.linalg.svdvals((0.7 * B.double() @ A.double()))
    assert torch.allclose(S.double(), dense[:12], rtol=1e-5)
    assert torch.allclose((U * S) @ Vh, 0.7 * B @ A, atol=1e-4)


def test_rank_too_large_is_refused():
    with pytest.raises(LoratoolsError, match="exceeds"):
        factor.factorize(torch.randn(10, 8), RankRule("rank", 9))


def test_budget_allocation_prefers_energy_per_parameter():
    spectra = {"big": (torch.tensor([10.0, 1.0]), 100), "small": (torch.tensor([5.0, 4.0, 3.0]), 10)}
    ranks = factor.allocate_budget(spectra, 140)
    assert ranks == {"big": 1, "small": 3}
    assert factor.parse_budget("20KB", 4) == 5000 and factor.parse_budget("5M", 2) == 5_000_000
