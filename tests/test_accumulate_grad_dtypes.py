"""CompressedAccumulator keeps gradients in the dtype autograd would (probe Z74, a new user's
sweep of dtypes): ``p.grad_dtype = None`` lets a bfloat16 parameter's gradient arrive in
float32 (here from a custom autograd Function), and plain accumulation keeps it so; a
gradient dtype other than the parameter's (``p.grad_dtype = torch.float64`` on a float32
parameter) is accumulated, not refused from inside compress()."""

import io

import pytest
import torch

from flora import CompressedAccumulator

TAU = 3


class _Float32Grad(torch.autograd.Function):
    """A bfloat16 weight used in float32: its gradient arrives in float32."""

    @staticmethod
    def forward(ctx, w):
        return w.float()

    @staticmethod
    def backward(ctx, g):
        return g.float()


def _weight():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 12).bfloat16())
    w.grad_dtype = None  # autograd keeps each gradient in the dtype it comes in
    return w


def _backward(w, i):
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(i))
    (x @ _Float32Grad.apply(w).t()).square().sum().backward()


def _run(mode, rank, n, *, save_at=None, state=None):
    """n micro-batches of a cycle of TAU (finish_cycle() for a short one), then SGD's step:
    the weight, the saved state (at micro-batch ``save_at``) and .grad's dtype at the step."""
    w = _weight()
    opt = torch.optim.SGD([w], lr=0.1)
    acc = None if mode == "plain" else CompressedAccumulator([w], rank=rank, tau=TAU, seed=1, optimizer=opt,
                                                             fused=mode == "fused")
    start, saved = 0, None
    if state is not None:
        with torch.no_grad():
            w.copy_(state["w"])
        acc.load_state_dict(state["acc"])
        start = state["i"]
    for i in range(start, n):
        if i == save_at:
            buf = io.BytesIO()
            torch.save({"w": w.detach(), "acc": acc.state_dict(), "i": i}, buf)
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
        _backward(w, i)
    if acc is not None and n < TAU:
        acc.finish_cycle()
    dtype = None if w.grad is None else w.grad.dtype
    if mode != "fused":
        opt.step()
    return w.detach().clone(), saved, dtype


@pytest.mark.parametrize("n", [TAU, 2])
@pytest.mark.parametrize("rank", [None, 4])
@pytest.mark.parametrize("mode", ["normal", "fused"])
def test_gradients_that_arrive_in_float32_are_kept_in_float32(mode, rank, n):
    """Plain accumulation keeps the float32 gradients of a bfloat16 parameter with
    ``grad_dtype = None``: so does the accumulator, in its sums, its estimate (a short
    cycle's too) and its resume. Dense (rank=None) it equals plain accumulation bit for bit
    (fused mode had summed in bfloat16: 0.031 off); a mid-cycle resume equals the run that
    never stopped (the float32 sum had been loaded as bfloat16)."""
    plain, _, plain_dtype = _run("plain", None, n)
    assert plain_dtype == torch.float32
    got, _, dtype = _run(mode, rank, n)
    if mode == "normal":
        assert dtype == torch.float32
    if rank is None:
        assert torch.equal(got, plain)
    _, saved, _ = _run(mode, rank, n, save_at=1)
    resumed, _, _ = _run(mode, rank, n, state=saved)
    assert torch.equal(resumed, got)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("param_dtype, grad_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_a_gradient_dtype_other_than_the_parameters_is_accumulated(param_dtype, grad_dtype, fused):
    """``p.grad_dtype`` wider or narrower than the parameter: the compressed sum is kept in
    the parameter's state dtype and the estimate written in the gradient's (it had failed
    inside compress() with "g is torch.float64 but the projection is torch.float32", naming
    no parameter); dense, it equals plain accumulation."""
    results = {}
    for rank in ("plain", None, 4):
        torch.manual_seed(0)
        model = torch.nn.Linear(12, 16).to(param_dtype)
        for p in model.parameters():
            p.grad_dtype = grad_dtype
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        in_backward = fused and rank == 4  # fused mode steps inside the backward (compressed only here)
        acc = None if rank == "plain" else CompressedAccumulator(model, rank=rank, tau=2, seed=1, optimizer=opt,
                                                                 fused=in_backward)
        for i in range(2):
            x = torch.randn(3, 12, dtype=param_dtype, generator=torch.Generator().manual_seed(i))
            model(x).square().sum().backward()
        if not in_backward:
            assert model.weight.grad.dtype == grad_dtype
            opt.step()
        if acc is not None:
            acc.remove()
        results[rank] = model.weight.detach().clone()
    assert torch.equal(results[None], results["plain"])
    assert torch.isfinite(results[4]).all() and not torch.equal(results[4], _initial(param_dtype))


def _initial(dtype):
    torch.manual_seed(0)
    return torch.nn.Linear(12, 16).to(dtype).weight.detach()
