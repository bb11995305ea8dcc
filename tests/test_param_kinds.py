"""Parameters of unusual kinds, as real models have them (a tester's probe, Z26,
2026-12-05): bfloat16 parameters that keep float32 gradients (``p.grad_dtype``), views
whose elements share memory, lazy modules before their dry run, and refusals that name
the parameter where Flora was given ``named_parameters()``. Each refusal comes before
any change."""

import pytest
import torch
from torch import nn
from transformers.optimization import Adafactor

from flora import CompressedAccumulator, Flora

torch.set_num_threads(1)

needs_grad_dtype = pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without p.grad_dtype")


def _bf16_model(grad_dtype=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Linear(24, 8)).bfloat16()
    if grad_dtype:
        for p in model.parameters():
            p.grad_dtype = torch.float32
    return model


def _loss(model, i):
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(i)).bfloat16()
    return model(x).float().square().mean()


def _train(make_opt, steps=4):
    model = _bf16_model()
    opt = make_opt(model)
    for i in range(steps):
        _loss(model, i).backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        opt.step()
        opt.zero_grad()
    return [p.detach().float() for p in model.parameters()]


@needs_grad_dtype
@pytest.mark.parametrize("rank", [None, 4])
def test_float32_gradients_of_bfloat16_parameters_step_alike_on_every_path(rank, monkeypatch):
    """``p.grad_dtype = torch.float32`` keeps a bfloat16 parameter's gradient in float32 by
    design: the step had refused it as a parameter whose data changed dtype. Every path
    takes it and agrees; with rank=None it is HF Adafactor's step number for number. The
    staged compiled step (every bucket staged here; by default those of 32 MiB or more)
    had failed after the step counters moved: it looked its bucket up by an alias of the
    parameter (probe Z34)."""
    import flora.functional as F

    kw = dict(lr=1e-2, rank=rank, beta1=0.9, scale_parameter=False, relative_step=False)
    ref = _train(lambda m: Flora(m.parameters(), foreach=False, **kw))
    for extra in (dict(foreach=True), dict(foreach=True, compile="aot_eager"), "staged"):
        if extra == "staged":
            monkeypatch.setattr(F, "STAGED_MIN_BYTES", 0)
            extra = dict(foreach=True, compile="aot_eager")
        got = _train(lambda m: Flora(m.parameters(), **kw, **extra))
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), extra
    if rank is None:
        hf = _train(lambda m: Adafactor(m.parameters(), lr=1e-2, beta1=0.9, scale_parameter=False,
                                        relative_step=False, warmup_init=False))
        assert all(torch.equal(a, b) for a, b in zip(ref, hf))


@needs_grad_dtype
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(foreach=True, compile="aot_eager"),
                                  "step_parameter"], ids=["single", "grouped", "compiled", "step_parameter"])
@pytest.mark.parametrize("dtype,grad_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float64),
                                              (torch.float32, torch.bfloat16)])
def test_a_gradient_dtype_flora_does_not_step_is_refused_by_name_before_any_change(path, dtype, grad_dtype):
    """``p.grad_dtype`` other than the parameter's dtype or its state's (float32 for a
    bfloat16 one) passed the step's checks and then failed inside the projection with
    advice about internals, after the step counters had moved (probe Z34); with rank=None
    it stepped in float64 on some paths. Now refused at the step, naming the parameter
    and the dtypes allowed, with nothing changed."""
    torch.manual_seed(0)
    model = nn.Linear(20, 12).to(dtype)
    model.weight.grad_dtype = grad_dtype
    model.weight.grad = torch.randn(12, 20, dtype=grad_dtype)
    model.bias.grad = torch.randn(12, dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    kw = {} if path == "step_parameter" else path
    opt = Flora(model.named_parameters(), lr=1e-2, rank=4, beta1=0.9, **kw)
    allowed = "torch.float32" if dtype == torch.float32 else "torch.bfloat16 or torch.float32"
    with pytest.raises(TypeError, match=rf"parameter 'weight' of dtype {dtype} \(shape \(12, 20\)\) has a gradient "
                                        rf"of dtype {grad_dtype} \(p.grad_dtype = {grad_dtype}\): Flora steps a "
                                        rf"{dtype} parameter with gradients of dtype {allowed}"):
        opt.step_parameter(model.weight) if path == "step_parameter" else opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state


@needs_grad_dtype
def test_a_bfloat16_parameter_that_takes_any_gradient_dtype_steps_with_float32_gradients():
    """``p.grad_dtype = None`` (torch: any dtype) with a float32 gradient was refused as a
    parameter whose data changed dtype (probe Z34); it steps as with ``grad_dtype =
    torch.float32``."""
    def run(declared):
        torch.manual_seed(0)
        p = nn.Parameter(torch.randn(12, 20).bfloat16())
        p.grad_dtype = declared
        opt = Flora([p], lr=1e-2, rank=4, beta1=0.9)
        for i in range(3):
            p.grad = torch.randn(12, 20, generator=torch.Generator().manual_seed(i))
            opt.step()
        return p.detach()

    assert torch.equal(run(None), run(torch.float32))


@needs_grad_dtype
@pytest.mark.parametrize("fused", [False, True])
def test_the_accumulator_keeps_float32_gradients_of_bfloat16_parameters(fused):
    """The accumulator wrote its placeholders and estimates in the parameter's dtype, which
    torch refuses for a parameter whose grad_dtype differs. Uncompressed it now equals plain
    accumulation (float32 sums); compressed, the gradients it hands over are float32."""
    def run(acc_kw):
        model = _bf16_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = None if acc_kw is None else CompressedAccumulator(model, tau=3, optimizer=opt, fused=fused, **acc_kw)
        for i in range(6):
            (_loss(model, i) / 3).backward()
            if i % 3 == 2:
                if acc is not None and not fused:
                    acc.finish_cycle()
                    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
                opt.step()
                opt.zero_grad()
        return [p.detach() for p in model.parameters()]

    plain = run(None)
    assert all(torch.equal(a, b) for a, b in zip(plain, run(dict(rank=None))))
    moved = run(dict(rank=4))
    assert all(torch.isfinite(p).all() for p in moved) and not torch.equal(moved[0], _bf16_model()[0].weight)


def _named_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({"tok": nn.Embedding(30, 8), "pos": nn.Embedding(30, 8, sparse=True), "out": nn.Linear(8, 8)})
    model.register_parameter("table", nn.Parameter(torch.zeros(1, 8).expand(30, 8)))
    return model


def test_step_refusals_name_the_parameter_and_change_nothing():
    """Given named_parameters(), the step's refusals (an expanded parameter, a sparse
    gradient) named only a shape; now the parameter, before any change."""
    model = _named_model()
    opt = Flora(model.named_parameters(), lr=1e-2, rank=4, beta1=0.9)
    ids = torch.tensor([1, 2, 3])
    (model["out"](model["tok"](ids) + model["pos"](ids)) + model.table[ids]).sum().backward()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=r"parameter 'table' \(shape \(30, 8\)\) is a view whose elements share "
                                         r"memory \(strides \(0, 1\)"):
        opt.step()
    model.table.data = model.table.data.clone()
    with pytest.raises(TypeError, match=r"sparse gradients \(got one for parameter 'pos.weight' \(shape \(30, 8\)\)\); "
                                        r"use dense gradients, sparse=False on its nn.Embedding or nn.EmbeddingBag"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters()) and not opt.state


@pytest.mark.parametrize("foreach", [False, True])
def test_a_view_whose_elements_overlap_without_a_zero_stride_is_refused(foreach):
    """as_strided((8, 6), (3, 1)) puts 48 elements on 27 locations: only a zero stride was
    looked for, and the paths stepped it differently (1e-2 apart). Refused before any
    change; a view with gaps, or with interleaved strides that share nothing, steps."""
    base = torch.randn(64)
    bad = nn.Parameter(base[:27].as_strided((8, 6), (3, 1)))
    gaps = nn.Parameter(torch.randn(100).as_strided((6, 5), (10, 2)))
    interleaved = nn.Parameter(torch.randn(12).as_strided((3, 2), (2, 5)))  # offsets 0-9, none twice
    ok = nn.Parameter(torch.randn(6, 4))
    opt = Flora([("ok", ok), ("bad", bad), ("gaps", gaps), ("interleaved", interleaved)], lr=1e-2, rank=2,
                beta1=0.9, foreach=foreach)
    for p in (ok, bad, gaps, interleaved):
        p.grad = torch.randn(p.shape)
    before = ok.detach().clone()
    with pytest.raises(ValueError, match=r"parameter 'bad' \(shape \(8, 6\)\) is a view whose elements share memory "
                                         r"\(strides \(3, 1\)"):
        opt.step()
    assert torch.equal(ok, before) and not opt.state
    bad.grad = None
    opt.step()
    assert len(opt.state) == 3 and not torch.equal(ok, before)


def test_fused_accumulation_refuses_an_expanded_parameter_before_any_step():
    """In fused mode the refusal came from the expanded parameter's own step, inside the
    cycle's last backward, after the parameters before it had stepped. Now at construction."""
    model = nn.Module()
    model.a = nn.Linear(12, 20)
    model.tab = nn.Parameter(torch.full((1, 20), 0.1).expand(6, 20))
    opt = Flora(model.named_parameters(), lr=1e-2, rank=4, beta1=0.9)
    with pytest.raises(ValueError, match=r"fused=True: parameter\(s\) \['tab'\] are views whose elements share"):
        CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=True)


def test_lazy_modules_before_their_dry_run_are_refused_naming_the_parameter():
    """Flora and the accumulator failed with torch's uninitialised-parameter error from
    inside their checks; now a refusal that names the parameter and says what to do."""
    model = nn.Sequential(nn.LazyLinear(5))
    with pytest.raises(ValueError, match=r"parameter '0.weight' is not initialised yet .*dry run"):
        Flora(model.named_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameter '0.weight' is not initialised yet .*dry run"):
        CompressedAccumulator(model, rank=2, tau=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.randn(2, 3))
    Flora(model.named_parameters(), lr=1e-2)


def test_add_param_group_names_a_complex_or_tied_parameter():
    """add_param_group dropped the name its group gave (param_names): the message read
    "got of dtype"; a tie named no parameter at all."""
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    opt = Flora([("w", nn.Parameter(torch.randn(3, 3)))], lr=1e-2)
    with pytest.raises(TypeError, match=r"complex parameters \(got parameter 'head.z' of dtype torch.complex64"):
        opt.add_param_group({"params": [z], "param_names": ["head.z"]})
    with pytest.raises(TypeError, match=r"complex parameters \(got a parameter of dtype torch.complex64"):
        opt.add_param_group({"params": [z]})
    a = nn.Parameter(torch.randn(12, 20))
    b = nn.Parameter(torch.empty(0))
    b.data = a.data
    with pytest.raises(ValueError, match=r"share memory \(shapes \(12, 20\) and \(12, 20\), named 'x' and 'y'"):
        Flora([("x", a), ("y", b)], lr=1e-2)
    opt = Flora([("x", a)], lr=1e-2)
    with pytest.raises(ValueError, match=r"named 'x' and 'y'"):
        opt.add_param_group({"params": [("y", b)]})
