"""The GEMM routing (oneDNN or aten) and the hand-written backward of the frozen linear layers."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from loratools.models.decoder import Linear, LoraSlot, _FrozenLinear, _LoraLinear
from loratools.ops import gemm


@pytest.fixture(params=["onednn", "aten"])
def backend(request, monkeypatch):
    """Run a test once with each library (oneDNN only where this machine's PyTorch passes its check)."""
    if request.param == "onednn":
        monkeypatch.setattr(gemm, "_CHOICE", None)
        monkeypatch.setenv("LORATOOLS_GEMM", "onednn")
        if not gemm.onednn():
            pytest.skip("oneDNN's float32 product is not usable in this PyTorch build")
    else:
        monkeypatch.setattr(gemm, "_CHOICE", False)
    return request.param


def test_linear_equals_the_float64_product_for_any_strides(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 41, 96, generator=g)
    w = torch.randn(70, 96, generator=g)
    b = torch.randn(70, generator=g)
    want = x.double() @ w.double().T + b.double()
    assert torch.allclose(gemm.linear(x, w, b).double(), want, rtol=1e-5, atol=1e-4)
    wt = w.T.contiguous()  # w stored transposed: linear(dy, wt.T) == dy @ wt
    dy = torch.randn(41, 96, generator=g)
    assert torch.allclose(gemm.linear(dy, wt.T).double(), dy.double() @ wt.double(), rtol=1e-5, atol=1e-4)
    xt = torch.randn(96, 41, generator=g).T  # a transposed input
    assert torch.allclose(gemm.linear(xt, w).double(), xt.double() @ w.double().T, rtol=1e-5, atol=1e-4)
    # other dtypes and empty inputs take PyTorch's own path
    assert gemm.linear(x.double(), w.double()).dtype == torch.float64
    assert gemm.linear(x[:, :0], w).shape == (3, 0, 70)


def test_the_choice_follows_the_environment():
    def run(mode):
        code = "from loratools.ops import gemm; print(gemm.onednn())"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"LORATOOLS_GEMM": mode, "PATH": "/usr/bin:/bin"}).stdout.strip()

    assert run("aten") == "False"
    forced = run("onednn")
    assert forced in ("True", "False")
    if forced == "True" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert run("auto") == "True"


def test_bucket_rounds_up_to_few_sizes():
    sizes = {gemm.bucket(n) for n in range(1, 4097)}
    assert all(n <= gemm.bucket(n) <= max(16, n * 1.125) for n in range(1, 4097))
    assert len(sizes) <= 1 + 8 * 8  # 16, then eight sizes per power of two up to 4096


def _reference(x, w, b, A, B, s):
    return F.linear(x, w, b) + s * F.linear(F.linear(x, A), B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_linear_backward_equals_autograd(backend, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=g, dtype=dtype)
    w, b = torch.randn(40, 24, generator=g, dtype=dtype), torch.randn(40, generator=g, dtype=dtype)
    A, B = torch.randn(4, 24, generator=g, dtype=dtype), torch.randn(40, 4, generator=g, dtype=dtype)
    dy = torch.randn(2, 9, 40, generator=g, dtype=dtype)
    grads = []
    for f in (_LoraLinear.apply, _reference):
        xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
        y = f(xs, w, b, As, Bs, 0.7)
        y.backward(dy)
        grads.append((y.detach(), xs.grad, As.grad, Bs.grad))
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(*grads):
        assert got.shape == want.shape and torch.allclose(got, want, **tol)
    if dtype == torch.float64:
        xs, As, Bs = (t.clone().requires_grad_() for t in (x[:, :3], A, B))
        assert torch.autograd.gradcheck(lambda a, b_, c: _LoraLinear.apply(a, w, b, b_, c, 0.7), (xs, As, Bs))
        assert torch.autograd.gradcheck(lambda a: _FrozenLinear.apply(a, w, b), (xs,))


def test_linear_module_paths_agree(backend):
    """Training path (hand-written backward), inference path and a trainable base all give the
    same outputs; gradients of the LoRA factors match plain autograd."""
    torch.manual_seed(0)
    lin = Linear(16, 12, True)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    A, B = torch.randn(3, 16).requires_grad_(), torch.randn(12, 3).requires_grad_()
    lin.loras.append(LoraSlot(A, B, 1.5))
    x = torch.randn(5, 16)
    y_trainable_base = lin(x)  # weight requires grad: PyTorch's own ops
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    y_train = lin(x)
    with torch.no_grad():
        y_eval = lin(x)
    ref = _reference(x, lin.weight, lin.bias, A, B, 1.5)
    for y in (y_trainable_base, y_train, y_eval):
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    gA, gB = torch.autograd.grad(y_train.square().sum(), (A, B))
    rA, rB = torch.autograd.grad(ref.square().sum(), (A, B))
    assert torch.allclose(gA, rA, rtol=1e-4, atol=1e-4) and torch.allclose(gB, rB, rtol=1e-4, atol=1e-4)


def test_non_contiguous_bias_is_read_correctly(backend):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(9, 16, generator=g), torch.randn(7, 16, generator=g)
    for b in (torch.randn(14, generator=g)[::2], torch.tensor(1.5).expand(7), torch.randn(20, generator=g)[5:12]):
        assert torch.allclose(gemm.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_autocast_training_takes_pytorchs_ops(fx):
    """Under autocast the hand-written backward and oneDNN's product (which autocast does not
    cast) step aside: a bf16-autocast forward and backward through LoRA layers work."""
    from loratools.models import load_model
    from loratools.train.loop import TrainConfig, add_lora

    model = load_model(fx / "models" / "llama")
    slots = add_lora(model, TrainConfig(rank=4, device="cpu"))
    with torch.no_grad():
        for s in slots.values():
            s.B.normal_(0, 0.02)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)[0]
    logits.float().square().mean().backward()
    grads = [p.grad for s in slots.values() for p in (s.A, s.B)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_second_order_gradients_are_refused_not_wrong():
    x = torch.randn(3, 8)
    w = torch.randn(5, 8)
    A, B = torch.randn(2, 8, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    (gB,) = torch.autograd.grad(_LoraLinear.apply(x, w, None, A, B, 1.0).square().sum(), (B,), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gB.square().sum().backward()


def test_rank_zero_lora_is_a_no_op():
    lin = Linear(8, 5, False)
    with torch.no_grad():
        lin.weight.normal_()
    lin.weight.requires_grad_(False)
    lin.loras.append(LoraSlot(torch.zeros(0, 8), torch.zeros(5, 0), 2.0))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.allclose(lin(x), F.linear(x, lin.weight), atol=1e-6)


def test_sum_sq_in_row_blocks():
    from loratools.ops.common import sum_sq

    g = torch.Generator().manual_seed(4)
    m = torch.randn(300, 70, generator=g)
    for t in (m, m.T, m[:, ::3], m.reshape(3, 100, 70), m[0], m[0, 0]):
        assert sum_sq(t, chunk=512) == pytest.approx(float(t.double().pow(2).sum()), rel=1e-12)
