"""Bad input, third round (a tester's probe, 2026-12-04): an accumulator checkpoint whose
counts say a parameter has a partial sum that the state lacks, ``projection_seed``'s
``stream``, and the errors of ``compress``, ``decompress`` and ``flora_state_bytes`` on
input of the wrong shape. Each refusal names the argument (or the parameter) and comes
before any change; valid input gives what it gave before."""

import numpy as np
import pytest
import torch
from torch import nn

from flora import CompressedAccumulator, Flora, compress, decompress, flora_state_bytes, make_projection, projection_seed
from flora.projection import ACCUMULATION_STREAM, COMMUNICATION_STREAM, MOMENTUM_STREAM

torch.set_num_threads(1)

TAU = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _batches(n=TAU, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 12, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


def _backward(model, batch):
    x, y = batch
    nn.functional.mse_loss(model(x), y).backward()


def _build(fused):
    return _accumulating(_model(), fused)


def _accumulating(model, fused):
    if fused:
        opt = Flora(model.parameters(), lr=1e-2)
        return model, opt, CompressedAccumulator(model, rank=4, tau=TAU, optimizer=opt, fused=True)
    return model, None, CompressedAccumulator(model, rank=4, tau=TAU)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert a[k].keys() == b[k].keys(), k
            assert all(torch.equal(a[k][i], b[k][i]) for i in a[k]), k
        else:
            assert a[k] == b[k], k


# ---------------------------------------------------------------- 1. accumulator checkpoint


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", ["compressed", "dense"])
def test_accumulator_refuses_a_state_missing_a_counted_partial_sum(kind, fused):
    batches = _batches()
    model, _, acc = _build(fused)
    for b in batches[:2]:
        _backward(model, b)
    sd = acc.state_dict()
    assert sd["counts"].tolist() == [2, 2, 2, 2] and sd[kind]
    k0 = min(sd[kind])
    name = dict(enumerate(n for n, _ in model.named_parameters()))[k0]
    damaged = {**sd, kind: {i: t for i, t in sd[kind].items() if i != k0}}

    # the accumulator refusing it is mid-cycle: nothing of it may change
    model2, opt2, acc2 = _build(fused)
    ref_model, ref_opt, ref_acc = _build(fused)
    for m in (model2, ref_model):
        _backward(m, batches[0])
    before = acc2.state_dict()
    with pytest.raises(ValueError, match="damaged") as e:
        acc2.load_state_dict(damaged)
    msg = str(e.value)
    assert repr(name) in msg and f"parameter index {k0}" in msg and kind in msg
    _same_state(acc2.state_dict(), before)
    # ... and it goes on as one that was never handed the damaged state
    for m in (model2, ref_model):
        for b in batches[1:]:
            _backward(m, b)
    if fused:
        for o in (opt2, ref_opt):
            o.step()
        assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), ref_model.parameters()))
        assert not any(torch.equal(p, q) for p, q in zip(model2.parameters(), _model().parameters()))  # it stepped
    else:
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model2.parameters(), ref_model.parameters()))


@pytest.mark.parametrize("fused", [False, True])
def test_accumulator_refuses_a_partial_sum_of_a_parameter_it_counts_nothing_of(fused):
    """The other way round: a partial sum for a parameter whose count is 0 (state_dict()
    saves none for an untouched parameter) was loaded and added into the next cycle."""
    model, _, acc = _build(fused)
    for b in _batches()[:2]:
        _backward(model, b)
    sd = acc.state_dict()
    counts = sd["counts"].clone()
    counts[0] = 0
    damaged = {**sd, "counts": counts}
    _, _, acc2 = _build(fused)
    before = acc2.state_dict()
    with pytest.raises(ValueError, match=r"holds a (compressed|dense) partial sum for '0.weight' .* counts no "
                                         r"micro-batch of it: the checkpoint is damaged"):
        acc2.load_state_dict(damaged)
    _same_state(acc2.state_dict(), before)


@pytest.mark.parametrize("fused", [False, True])
def test_accumulator_still_loads_the_states_it_saves(fused):
    """Mid-cycle states, including one where a parameter got no gradient (count 0, no
    partial sum), still load, and the resumed cycle ends as the uninterrupted one."""
    batches = _batches()

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 5)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    def build():
        return _accumulating(Branchy(), fused)

    def run(model, bs):
        for x, y in bs:
            nn.functional.mse_loss(model(x), y).backward()

    model, opt, acc = build()
    run(model, batches[:2])
    sd = acc.state_dict()
    assert sd["counts"].tolist() == [2, 2, 0, 0]  # b: no gradient, no partial sum
    model2, opt2, acc2 = build()
    acc2.load_state_dict(sd)
    run(model, batches[2:])
    run(model2, batches[2:])
    if fused:
        opt.step()
        opt2.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    else:
        for p, q in zip(model.parameters(), model2.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


# ---------------------------------------------------------------- 2. projection_seed's stream


@pytest.mark.parametrize("stream, error", [(1.7, TypeError), ("1", TypeError), (True, TypeError), (None, TypeError),
                                           (torch.tensor(1), TypeError), (-1, ValueError), (2**64, ValueError),
                                           (2**64 + 1, ValueError)])
def test_projection_seed_refuses_a_bad_stream(stream, error):
    with pytest.raises(error, match="^stream must be"):
        projection_seed(1, 2, 3, stream)
    with pytest.raises(error, match="^stream must be"):
        projection_seed(1, 2, 3, stream=stream)


def test_projection_seed_of_valid_streams_unchanged():
    # the values before stream was checked: a valid stream gives the seeds it gave
    assert projection_seed(1, 2, 3) == projection_seed(1, 2, 3, MOMENTUM_STREAM) == 7510213797696614745
    assert projection_seed(1, 2, 3, ACCUMULATION_STREAM) == projection_seed(1, 2, 3, np.int64(1))
    assert projection_seed(1, 2, 3, COMMUNICATION_STREAM) == 892513340437925964
    assert projection_seed(1, 2, 3, 2**64 - 1) == 1733807159707738918
    assert len({projection_seed(1, 2, 3, s) for s in (0, 1, 2, 3, 2**64 - 1)}) == 5


# ---------------------------------------------------------------- 3. compress / decompress / flora_state_bytes


def test_compress_refuses_coordinates_out_of_range():
    idx = make_projection("coordinates", 1, 4, 20)
    assert int(idx.max()) >= 10
    with pytest.raises(ValueError, match=r"^compress: the coordinate projection holds indices .* outside \[0, 10\)"):
        compress(torch.randn(10, 7), idx, 0)
    with pytest.raises(ValueError, match=r"^compress: the coordinate projection .* outside \[0, 10\)"):
        compress(torch.randn(7, 10), idx, 1)
    # a stack of them (k x r coordinates of a k x n x m stack)
    stack = torch.stack([idx, idx])
    with pytest.raises(ValueError, match=r"^compress: the coordinate projection .* outside \[0, 10\)"):
        compress(torch.randn(2, 10, 7), stack, 0)


@pytest.mark.parametrize("kind", ["gaussian", "orthonormal"])
def test_compress_refuses_a_projection_of_another_size(kind):
    a = make_projection(kind, 1, 4, 20)
    with pytest.raises(ValueError, match=r"^compress: the projection maps a dimension of 20 .* dimension 0 has size 19"):
        compress(torch.randn(19, 7), a, 0)
    with pytest.raises(ValueError, match=r"^compress: the projection maps a dimension of 20 .* dimension 1 has size 19"):
        compress(torch.randn(7, 19), a, 1)
    with pytest.raises(ValueError, match=r"^compress: the projection maps a dimension of 20 .* dimension 1 has size 9"):
        compress(torch.randn(2, 7, 9), torch.stack([a, a]), 1)


# (projection kind, c's shape, dim, size=, the error): each refused naming what does not fit
_DECOMPRESS_MISFITS = [
    ("coordinates", (4, 7), 0, 5, r"^decompress: the coordinate projection .* outside \[0, 5\) \(size=5"),
    ("coordinates", (7, 4), 1, 3, r"^decompress: the coordinate projection .* outside \[0, 3\) \(size=3"),
] + [(kind, shape, dim, 20, rf"^decompress: c has {n} {what} \(shape \({shape[0]}, {shape[1]}\)\) but the projection "
                                r"has rank 4")
     for kind in ("coordinates", "gaussian", "orthonormal")
     for shape, dim, n, what in (((3, 7), 0, 3, "rows"), ((7, 5), 1, 5, "columns"))]


@pytest.mark.parametrize("kind,shape,dim,size,said", _DECOMPRESS_MISFITS)
def test_decompress_refuses_what_does_not_fit(kind, shape, dim, size, said):
    """Coordinates out of range for size=, and c of another rank than the projection's."""
    with pytest.raises(ValueError, match=said):
        decompress(torch.randn(shape), make_projection(kind, 1, 4, 20), dim, size=size)


@pytest.mark.parametrize("kind", ["coordinates", "gaussian", "orthonormal"])
def test_compress_decompress_of_valid_input_unchanged(kind):
    g = torch.Generator().manual_seed(3)
    for dim, shape in ((0, (20, 7)), (1, (7, 20)), (1, (2, 3, 20))):
        x = torch.randn(shape, generator=g)
        a = make_projection(kind, 1, 4, 20)
        m = x.reshape(-1, x.shape[-1]) if x.dim() == 3 else x
        if kind == "coordinates":
            want_c = m.index_select(dim, a)
        else:
            want_c = a @ m if dim == 0 else m @ a.T
        c = compress(x, a, dim)
        assert torch.equal(c, want_c)
        back = decompress(c, a, dim, size=20)
        if kind == "coordinates":
            want = torch.zeros_like(m).index_add_(dim, a, c)
        else:
            want = a.T @ c if dim == 0 else c @ a
        assert torch.equal(back, want)


@pytest.mark.parametrize("shapes", [(30, 40), torch.Size([30, 40]), [30, 40], (np.int64(30), 40)])
def test_flora_state_bytes_refuses_a_single_shape(shapes):
    with pytest.raises(TypeError, match=r"^flora_state_bytes: shapes must be a list of shapes .*got a single shape "
                                        r"\(30, 40\): pass \[\(30, 40\)\]"):
        flora_state_bytes(shapes, rank=2, beta1=0.9)


@pytest.mark.parametrize("shapes, said", [(30, "got 30 (int)"), (None, "got None"), ("30x40", "got '30x40'"),
                                          (torch.ones(3, 3), "got a tensor of shape (3, 3)"),
                                          ([(30, 40), 5], "got 5 (int) among them"),
                                          ([torch.ones(2, 2)], "got a tensor (of shape (2, 2)) among them")])
def test_flora_state_bytes_refuses_what_holds_no_shapes(shapes, said):
    with pytest.raises(TypeError, match=r"^flora_state_bytes: shapes must be a list of shapes") as e:
        flora_state_bytes(shapes, rank=2, beta1=0.9)
    assert said in str(e.value)


def test_flora_state_bytes_counts_numpy_dims_as_python_ints():
    """numpy's int32 dims had wrapped round in the products (Llama-3-70B's embedding counted
    as -91,663,360 bytes), and numpy int64 dims returned an np.int64 (probe Z137)."""
    import numpy as np

    shapes = [(128256, 8192), (8192,)]
    want = flora_state_bytes(shapes, rank=None, beta1=0.9)
    assert want == 4 * (128256 + 8192 + 8192) + 4 * (128256 * 8192 + 8192) > 2 ** 31
    for dt in (np.int32, np.int64):
        got = flora_state_bytes([tuple(dt(d) for d in s) for s in shapes], rank=None, beta1=0.9)
        assert got == want and type(got) is int
    got = flora_state_bytes([np.array(s) for s in shapes], rank=None, beta1=0.9)
    assert got == want and type(got) is int


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, "float8_e5m2", torch.complex64, torch.int32])
def test_flora_state_bytes_takes_the_dtypes_flora_steps(dtype):
    """float8 parameters, which Flora refuses, had been sized (probe Z137)."""
    with pytest.raises(ValueError, match=r"flora_state_bytes: dtype must be one Flora steps, torch.float16, "
                                         r"torch.bfloat16, torch.float32, torch.float64"):
        flora_state_bytes([(4, 4)], rank=2, beta1=0.9, dtype=dtype)


def test_flora_state_bytes_of_valid_shapes_unchanged():
    assert flora_state_bytes([(30, 40), (7,)], rank=2, beta1=0.9) == 482
    assert flora_state_bytes((s for s in [(30, 40)]), rank=2, beta1=0.9) == 440
    assert flora_state_bytes([torch.Size([3, 4])], rank=2, beta1=0.9) == 44
    assert flora_state_bytes([], rank=2, beta1=0.9) == 0
    model = _model()
    assert flora_state_bytes([p.shape for p in model.parameters()], rank=2, beta1=None) > 0


def test_arguments_found_by_a_probe_of_the_public_api():
    """(Probe Z33.) An int too large for a float passed the "finite" check and failed in the
    step with a bare OverflowError; flora_state_bytes refused a numpy proj_dim that Flora
    takes; decompress(size="30") failed in torch; the eps message said "non-negative" for
    values that must be positive; an explicit relative_step was overridden, silently, by a
    group's lr (or its lack of one)."""
    p = nn.Parameter(torch.randn(4, 4))
    for kw, name in ((dict(lr=10 ** 400), "lr"), (dict(lr=1e-3, weight_decay=10 ** 400), "weight_decay")):
        with pytest.raises(ValueError, match=rf"{name} must be a finite real number .* got 100000000000\.\.\.e400"):
            Flora([p], **kw)
    assert flora_state_bytes([(20, 30)], rank=np.int64(4), beta1=np.float64(0.9), proj_dim=np.int64(0)) == \
        flora_state_bytes([(20, 30)], rank=4, beta1=0.9, proj_dim=0)
    with pytest.raises(ValueError, match=r"decompress: size must be a non-negative int .* got '30'"):
        decompress(torch.randn(20, 8), make_projection("coordinates", 3, 8, 30), 1, size="30")
    with pytest.raises(TypeError, match=r"eps must be a pair \(eps1, eps2\) of numbers, eps1 > 0 and eps2 >= 0"):
        Flora([p], lr=1e-3, eps=(1e-30,))
    with pytest.raises(ValueError, match=r"lr must be None when relative_step=True .* got 0\.001"):
        Flora([{"params": [p], "lr": 1e-3}], lr=None, relative_step=True)
    with pytest.raises(ValueError, match=r"lr must be a non-negative number when relative_step=False"):
        Flora([{"params": [p], "lr": None}], lr=1e-3, relative_step=False)
    opt = Flora([{"params": [p], "lr": 1e-3}])  # relative_step left to each group: its lr decides
    assert opt.param_groups[0]["relative_step"] is False


def test_a_state_of_shifted_positions_names_the_first_parameter_that_differs():
    """(Probe Z31.) A peft model given one more, inactive adapter keeps its trainable names
    and shapes but shifts their positions among all parameters: the refusal said only
    "8 parameters, this accumulator 8 (or different ones)". It names the first that differs
    and what positions count."""
    saved = CompressedAccumulator(_model(), rank=4, tau=TAU).state_dict()
    torch.manual_seed(0)
    shifted = nn.Sequential(nn.Linear(12, 12).requires_grad_(False), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"the first that differs: '1.weight' is parameter 2 of the model here, the "
                                         r"saved one's was parameter 0\. Positions count every parameter"):
        CompressedAccumulator(shifted, rank=4, tau=TAU).load_state_dict(saved)


@pytest.mark.parametrize("scheduler", ["CosineAnnealingLR", "StepLR", "ReduceLROnPlateau"])
def test_a_torch_scheduler_over_a_relative_step_is_said_at_the_step_naming_the_way_out(scheduler):
    """Flora(params) (lr=None: the relative step) under a torch scheduler failed at the
    scheduler's next step with a bare TypeError of None and a float (a probe). Where the
    scheduler builds (it copies lr to initial_lr), Flora's step says so once, naming
    flora.RelativeStepSchedule; a warning, since the key stays after such a scheduler is
    dropped (a review: a refusal blocked the way out it named). ReduceLROnPlateau sets no
    initial_lr: nothing to see."""
    import warnings

    from torch.optim import lr_scheduler

    m = torch.nn.Linear(4, 3)
    opt = Flora(m.parameters())
    kw = {"CosineAnnealingLR": dict(T_max=10), "StepLR": dict(step_size=2), "ReduceLROnPlateau": {}}[scheduler]
    getattr(lr_scheduler, scheduler)(opt, **kw)
    m(torch.randn(2, 4)).sum().backward()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.step()
        opt.step_parameter(m.weight)
    said = [str(w.message) for w in seen if "initial_lr=None" in str(w.message)]
    if scheduler == "ReduceLROnPlateau":
        assert not said
        return
    assert len(said) == 1 and "parameter group 0 has lr=None" in said[0] and "flora.RelativeStepSchedule" in said[0]


def test_the_relative_step_schedule_after_a_torch_scheduler_failed_over_lr_none():
    """The way out the warning names: a torch scheduler that failed at its construction
    (LambdaLR, as the Trainer's own) leaves initial_lr=None; RelativeStepSchedule drops it,
    and the steps run with nothing said."""
    import warnings

    import flora
    from torch.optim import lr_scheduler

    m = torch.nn.Linear(4, 3)
    opt = Flora(m.parameters())
    with pytest.raises(TypeError):
        lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched = flora.RelativeStepSchedule(opt)
    assert "initial_lr" not in opt.param_groups[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            m(torch.randn(2, 4)).sum().backward()
            opt.step()
            sched.step()
            opt.zero_grad()


def test_public_api_refusals_from_the_contract_probe():
    """Probe Z119 (2026-12-07): an integer tensor given to compress was told to draw the
    projection in int64 (which make_projection refuses); unbiased="no" was truthy (scaled);
    flora_state_bytes took a compile= of any type; an accumulator given a
    generator that Flora had read was told it had no trainable parameter."""
    a = make_projection("gaussian", 0, 2, 6)
    with pytest.raises(ValueError, match="compress: g is torch.int64; a matrix projection multiplies floating-point"):
        compress(torch.ones(6, 4, dtype=torch.int64), a, 0)
    with pytest.raises(TypeError, match="unbiased must be True or False, got 'no'"):
        make_projection("orthonormal", 0, 2, 6, unbiased="no")
    # compile's type is checked; a backend's name is not looked up (that imports dynamo: seconds)
    with pytest.raises(TypeError, match="compile must be True, False"):
        flora_state_bytes([(8, 8)], rank=2, beta1=0.9, compile=3)
    assert flora_state_bytes([(8, 8)], rank=2, beta1=0.9, compile=True) == flora_state_bytes([(8, 8)], rank=2, beta1=0.9)
    model = _model()
    params = model.parameters()
    Flora(params, lr=1e-3)
    with pytest.raises(ValueError, match="model_or_params is an empty parameter list .* can be read once"):
        CompressedAccumulator(params, rank=2, tau=TAU)
    with pytest.raises(ValueError, match="model_or_params has no parameter with requires_grad=True"):
        CompressedAccumulator([nn.Parameter(torch.ones(3), requires_grad=False)], rank=2, tau=TAU)
    with pytest.raises(ValueError, match="model_or_params has no parameter with requires_grad=True"):
        CompressedAccumulator(nn.ReLU(), rank=2, tau=TAU)  # a module without parameters: not a read generator


def test_an_option_refused_in_a_constructor_group_names_the_group():
    """Probe Z126: a constructor group's refusal named no group ("rank must be a positive
    integer or None, got 0"), and a group whose own lr turned its relative step off beside
    the constructor's warmup_init=True was told "warmup_init=True requires
    relative_step=True", an option the user never wrote. Edits made mid-run named the
    group already; a group of the constructor's options alone says nothing more."""
    def param():
        return nn.Parameter(torch.randn(3))

    with pytest.raises(ValueError, match=r"got 0 \(in param_groups\[1\], which sets rank\)$"):
        Flora([{"params": [param()]}, {"params": [param()], "rank": 0}])
    with pytest.raises(ValueError, match=r"warmup_init=True requires relative_step=True \(in param_groups\[1\], which "
                                         r"sets lr; its own lr=0.01 turns its relative step off"):
        Flora([{"params": [param()]}, {"params": [param()], "lr": 1e-2}], warmup_init=True)
    # (review Z128) the hint for the warmup refusal only; the keys the user wrote, not those
    # Flora added (complement_weight) or renamed (the legacy momentum)
    with pytest.raises(ValueError, match=r"got -1.0 \(in param_groups\[0\], which sets lr\)$"):
        Flora([{"params": [param()], "lr": -1.0}], warmup_init=True)
    with pytest.raises(ValueError, match=r"got 0 \(in param_groups\[1\], which sets momentum_form, rank\)$"):
        Flora([{"params": [param()]}, {"params": [param()], "momentum_form": "exact", "rank": 0}])
    with pytest.warns(FutureWarning), \
            pytest.raises(ValueError, match=r"got 0 \(in param_groups\[1\], which sets momentum, rank\)$"):
        Flora([{"params": [param()]}, {"params": [param()], "momentum": "exact", "rank": 0}])
    with pytest.raises(ValueError, match=r"^rank must be a positive integer or None, got 0$"):
        Flora([param()], rank=0)
    with pytest.raises(ValueError, match=r"^warmup_init=True requires relative_step=True$"):
        Flora([param()], lr=1e-2, warmup_init=True, relative_step=False)
