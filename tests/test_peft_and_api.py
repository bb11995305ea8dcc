"""Found by a new-user probe of Flora with peft and of the low-level API (2026-12-04):
each test fails on the code before its fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import flora
from flora import compress, decompress, make_projection, projection_seed, transfer


class _Lora(nn.Module):
    """A frozen base weight with a trainable low-rank pair, as peft builds it."""

    def __init__(self, r=4):
        super().__init__()
        self.base = nn.Linear(32, 32)
        self.base.requires_grad_(False)
        self.a = nn.Parameter(torch.randn(r, 32) * 0.1)
        self.b = nn.Parameter(torch.zeros(32, r))

    def forward(self, x):
        return self.base(x) + x @ self.a.T @ self.b.T


def test_nothing_compressed_is_said_when_only_frozen_tensors_would_be():
    """Given every parameter of a LoRA model (the usual optimizers=(opt, None)), the
    frozen base weights made the warning think something was compressed."""
    m = _Lora(r=4)
    with pytest.warns(UserWarning, match="no tensor keeps compressed momentum"):
        flora.Flora(m.parameters(), lr=1e-3, rank=8, beta1=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flora.Flora(_Lora(r=16).parameters(), lr=1e-3, rank=8, beta1=0.9)  # the adapters are compressed


def test_nothing_compressed_counts_frozen_tensors_that_would_be():
    """An inactive adapter (frozen at construction; peft's set_adapter makes it trainable
    later) was left out of the warning, which said nothing is compressed (a probe: 12
    tensors were, once active). The warning now counts the frozen tensors that would be."""
    m = _Lora(r=16)
    m.a.requires_grad_(False)
    m.b.requires_grad_(False)
    m.base.bias.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"no tensor keeps compressed momentum \(of those trainable now\).*"
                                         r"; 3 frozen tensors would, if made trainable \(frozen base weights "
                                         r"under an adapter, or an inactive adapter\)"):  # base weights first: Z47
        flora.Flora(m.parameters(), lr=1e-3, rank=8, beta1=0.9)
    with pytest.warns(UserWarning) as seen:  # nothing frozen would be: said as before
        flora.Flora([m.base.bias], lr=1e-3, rank=8, beta1=0.9)
    assert "frozen tensor" not in str(seen[0].message)
    frozen_1d = torch.nn.Parameter(torch.randn(64), requires_grad=False)  # a 1-D tensor never would (Z78)
    with pytest.warns(UserWarning) as seen:
        flora.Flora([m.base.bias, frozen_1d], lr=1e-3, rank=8, beta1=0.9)
    assert "frozen tensor" not in str(seen[0].message)


def test_summary_says_frozen_tensors_keep_the_state_made_before():
    m = _Lora(r=16)
    opt = flora.Flora(m.parameters(), lr=1e-3, rank=8, beta1=0.9)
    m(torch.randn(4, 32)).square().sum().backward()
    opt.step()
    m.a.requires_grad_(False)
    first = opt.summary().splitlines()[0]
    assert "3 more frozen" in first and "1 of them keep the state made before they were frozen" in first


def test_fused_mode_refuses_a_forward_with_parameters_it_does_not_step():
    """After the accumulator's parameters were frozen and others made trainable (peft's
    set_adapter), none of its hooks ran: the new ones never stepped, silently."""
    m = _Lora(r=16)
    opt = flora.Flora([m.a, m.b], lr=1e-2, rank=8, beta1=0.9)
    acc = flora.CompressedAccumulator(m, rank=8, tau=2, optimizer=opt, fused=True)
    for _ in range(2):
        m(torch.randn(4, 32)).square().sum().backward()
    m.a.requires_grad_(False)
    m.b.requires_grad_(False)
    m.base.weight.requires_grad_(True)  # the switch
    opt.add_param_group({"params": [m.base.weight]})
    with torch.no_grad():
        m(torch.randn(4, 32))  # evaluation: nothing to step
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) not given to the accumulator \(base.weight"):
        m(torch.randn(4, 32))
    acc.remove()
    m(torch.randn(4, 32))  # the guard goes with the accumulator


def test_cache_and_workspace_bytes_look_through_accelerates_wrapper():
    """The Trainer's trainer.optimizer is accelerate's AcceleratedOptimizer: state_bytes
    counted through it, cache_bytes and workspace_bytes said 0."""
    from accelerate import Accelerator

    w = nn.Parameter(torch.randn(32, 32))
    opt = flora.Flora([w], lr=1e-2, rank=4, beta1=0.9)
    wrapped = Accelerator(cpu=True).prepare(opt)
    w.grad = torch.randn(32, 32)
    wrapped.step()
    assert flora.cache_bytes(opt) == 4 * 4 * 32 and flora.cache_bytes(wrapped) == flora.cache_bytes(opt)
    assert flora.workspace_bytes(wrapped) == 0
    for bad in (nn.Linear(2, 2), None):
        with pytest.raises(TypeError, match="cache_bytes takes an optimizer"):
            flora.cache_bytes(bad)
    # the constructor's keyword arguments as they are: foreach and compile change no state size
    assert flora.flora_state_bytes([(32, 32)], rank=4, beta1=0.9, foreach=True, compile=True) == \
        flora.flora_state_bytes([(32, 32)], rank=4, beta1=0.9)


@pytest.mark.parametrize("fn", ["compress", "decompress", "transfer"])
@pytest.mark.parametrize("dim", [2, -1, True, "auto", 1.0])
def test_the_low_level_functions_take_dim_0_or_1_only(fn, dim):
    """Any value but 0 was taken as 1 ('auto' projected the columns whatever the shape)."""
    g, a = torch.randn(6, 10), make_projection("orthonormal", 0, 3, 10)
    call = {"compress": lambda: compress(g, a, dim), "decompress": lambda: decompress(torch.randn(6, 3), a, dim),
            "transfer": lambda: transfer(torch.randn(6, 3), a, a, dim)}[fn]
    with pytest.raises(ValueError, match=f"{fn}: dim must be 0 .* or 1"):
        call()


def test_decompress_checks_a_matrix_projections_size():
    """size= was ignored for matrix projections: a wrong size gave a matrix of the other size."""
    a = make_projection("orthonormal", 0, 3, 10)
    c = torch.randn(6, 3)
    assert decompress(c, a, 1, size=10).shape == (6, 10) == decompress(c, a, 1).shape
    with pytest.raises(ValueError, match="decompress: size=12 does not match the projection"):
        decompress(c, a, 1, size=12)


_M = make_projection("orthonormal", 0, 3, 10)
_K = make_projection("coordinates", 0, 3, 10)


@pytest.mark.parametrize("call,words", [
    (lambda: compress(torch.randn(4, 10, dtype=torch.bfloat16), _M, 1),
     r"compress: g is torch.bfloat16 but the projection is torch.float32; draw the projection in g's dtype"),
    (lambda: decompress(torch.randn(4, 3, dtype=torch.float64), _M, 1), r"decompress: c is torch.float64"),
    (lambda: transfer(torch.randn(4, 3, dtype=torch.float64), _M, _M, 1), r"transfer: c is torch.float64"),
    (lambda: transfer(torch.randn(4, 3), _M, make_projection("orthonormal", 1, 3, 12), 1),
     r"transfer: a_old \(shape \(3, 10\).*must be projections of one kind, rank, size and dtype"),
    (lambda: transfer(torch.randn(4, 3), _K, _M, 1), r"transfer: a_old .* must be projections of one kind"),
    (lambda: transfer(torch.randn(4, 5), _M, _M, 1), r"transfer: c \(shape \(4, 5\)\) must be the compressed "
                                                     r"tensor of a rank-3 projection along dim=1: n x r"),
    (lambda: decompress(torch.randn(3), _M, 1), r"decompress: c must have 2 or more dims"),
    (lambda: decompress(torch.randn(3), _K, 1, size=10), r"decompress: c must have 2 or more dims"),
    (lambda: decompress(torch.randn(4, 3), _K, 1, size=10.0), r"decompress: size must be a non-negative int"),
    (lambda: decompress(torch.randn(4, 3), _K, 1, size=-1), r"decompress: size must be a non-negative int"),
], ids=["compress-dtype", "decompress-dtype", "transfer-dtype", "transfer-size", "transfer-kinds", "transfer-rank",
        "decompress-vector", "decompress-vector-coordinates", "decompress-float-size", "decompress-negative-size"])
def test_the_low_level_functions_name_what_is_wrong(call, words):
    """These had raised torch's own errors ('expected m1 and m2 to have the same dtype', 'mat1
    and mat2 shapes cannot be multiplied', 'negative dimension -1', ...), or, for a vector c
    and a matrix projection, returned a vector (probe Z7)."""
    with pytest.raises(ValueError, match=words):
        call()


_V = torch.randn(10)  # one row of a projection, a[0], by mistake


@pytest.mark.parametrize("call,error,words", [
    (lambda: compress(torch.randn(10, 6), _V, 0), ValueError, r"compress: the projection has shape \(10,\)"),
    (lambda: compress(torch.randn(10, 6), torch.tensor(1.0), 0), ValueError, r"compress: the projection has shape"),
    (lambda: decompress(torch.randn(3, 6), _V, 0), ValueError, r"decompress: the projection has shape \(10,\)"),
    (lambda: transfer(torch.randn(3, 6), _V, _V, 0), ValueError, r"transfer: a_old has shape \(10,\)"),
    (lambda: transfer(torch.randn(4, 3), _M, _M.double(), 1), ValueError,
     r"a_new \(shape \(3, 10\), torch.float64\) must be projections of one kind, rank, size and dtype"),
    (lambda: compress(torch.randn(4, 10).numpy(), _M, 1), TypeError, r"compress: g must be a torch.Tensor; got ndarray"),
    (lambda: decompress([[0.0] * 3] * 4, _M, 1), TypeError, r"decompress: c must be a torch.Tensor; got list"),
    (lambda: compress(torch.randn(4, 10), None, 1), TypeError, r"compress: the projection must be a torch.Tensor"),
    (lambda: compress(torch.randn(4, 10, dtype=torch.complex64), _M, 1), ValueError,
     r"compress: g is torch.complex64; a matrix projection is real .* g.real and g.imag apart"),
], ids=["1-D", "0-d", "decompress-1-D", "transfer-1-D", "transfer-dtypes", "numpy", "list", "none", "complex"])
def test_the_low_level_functions_refuse_what_is_not_a_projection_or_a_tensor(call, error, words):
    """Probe Z137: a 1-D float vector was taken as a projection by compress (a wrong result),
    or failed inside torch; a_old and a_new of two dtypes, numpy arrays and lists failed in
    torch or Python; a complex g was told to draw a complex projection, which make_projection
    refuses."""
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("kind", ["gaussian", "orthonormal", "coordinates"])
@pytest.mark.parametrize("dim", [0, 1])
def test_decompress_of_a_batch_with_one_projection_is_each_matrixs(kind, dim):
    """A leading batch of compressed matrices under one projection decompresses as each
    matrix alone, for every kind (coordinates had failed inside index_add_, probe Z137)."""
    a = make_projection(kind, 0, 3, 10)
    c = torch.randn(2, 3, 5) if dim == 0 else torch.randn(2, 5, 3)
    assert torch.equal(decompress(c, a, dim, size=10), torch.stack([decompress(x, a, dim, size=10) for x in c]))


def test_the_low_level_functions_take_mixed_dtypes_under_autocast():
    """Under autocast the matmul casts both operands: the dtype check must not refuse what
    worked before it (a review)."""
    g, c = torch.randn(4, 10, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compress(g, _M, 1).shape == (4, 3)
        assert decompress(c, _M, 1).shape == (4, 10)
        assert transfer(c, _M, _M, 1).shape == (4, 3)


def test_int32_coordinates_are_named():
    with pytest.raises(ValueError, match=r"compress: the projection has dtype torch.int32; .* a coordinate "
                                         r"projection an int64 index vector"):
        compress(torch.randn(4, 10), _K.to(torch.int32), 1)
    # decompress and transfer too (transfer had failed with a bare IndexError: a review)
    with pytest.raises(ValueError, match=r"decompress: the projection has dtype torch.int32; .* a coordinate"):
        decompress(torch.randn(4, 3), _K.to(torch.int32), 1, size=10)
    with pytest.raises(ValueError, match=r"transfer: a_old has dtype torch.int32; .* a coordinate"):
        transfer(torch.randn(4, 3), _K.to(torch.int32), _K.to(torch.int32), 1)


def test_compress_refuses_a_vector():
    with pytest.raises(ValueError, match="compress: g must have 2 or more dims"):
        compress(torch.randn(10), make_projection("orthonormal", 0, 3, 10), 1)


@pytest.mark.parametrize("seed,error", [(1.5, TypeError), ("7", TypeError), (-1, ValueError), (2 ** 63, ValueError)])
def test_projection_seeds_are_checked_as_floras(seed, error):
    """make_projection truncated floats, parsed strings and folded negative or large seeds
    onto others; projection_seed checked the range of the base seed only."""
    with pytest.raises(error, match="seed must be an integer in"):
        make_projection("gaussian", seed, 2, 4)
    with pytest.raises(error, match="seed must be an integer in"):
        projection_seed(seed, 0, 0)
    with pytest.raises(ValueError, match="index must be a non-negative integer"):
        projection_seed(0, -1, 0)
    with pytest.raises(ValueError, match="count must be below 2\\*\\*64"):
        projection_seed(0, 0, 2 ** 64)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        make_projection("gaussian", 0, 2, 4, dtype=torch.int32)


def test_a_group_with_lr_none_takes_the_relative_step():
    """relative_step's default is per group: a group giving lr=None under Flora(lr=1e-3)
    was refused ('lr must be a non-negative number when relative_step=False')."""
    ps = [nn.Parameter(torch.randn(8, 8)) for _ in range(2)]
    opt = flora.Flora([{"params": ps[:1], "lr": None}, {"params": ps[1:]}], lr=1e-3)
    assert [(g["lr"], g["relative_step"]) for g in opt.param_groups] == [(None, True), (1e-3, False)]


def test_groups_that_each_give_an_lr_need_none_from_flora():
    """(Probe Z47.) LoRA+'s groups, A and B at their own lrs, with relative_step=False and no
    lr given to Flora, were refused by the check of Flora's own default (HF Adafactor takes
    them); a group without an lr of its own is still refused, saying what to give."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(8, 32)), nn.Parameter(torch.randn(32, 8))
    kw = dict(relative_step=False, scale_parameter=False, warmup_init=False)
    opt = flora.Flora([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 16e-3}], **kw)
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    hf = Adafactor([{"params": [a2], "lr": 1e-3}, {"params": [b2], "lr": 16e-3}], **kw)
    for _ in range(3):
        for p, q in ((a, a2), (b, b2)):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        hf.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)
    opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"lr must be a non-negative number when relative_step=False \(give Flora an "
                                         r"lr, or each parameter group its own\)"):
        flora.Flora([{"params": [a], "lr": 1e-3}, {"params": [b]}], **kw)


def test_a_deep_copy_of_a_fused_model_is_not_watched():
    """The guard above is a forward pre-hook on the model: a deep copy carries it, and
    its own parameters are not the accumulator's."""
    import copy

    m = _Lora(r=16)
    opt = flora.Flora([m.a, m.b], lr=1e-2, rank=8, beta1=0.9)
    flora.CompressedAccumulator(m, rank=8, tau=2, optimizer=opt, fused=True)
    probe = copy.deepcopy(m)
    probe(torch.randn(4, 32)).square().sum().backward()
    assert probe.a.grad is not None


def test_the_accumulator_says_when_it_compresses_nothing():
    """Flora warns when a rank is set and nothing is compressed; the accumulator said
    nothing (LoRA adapters of rank 4 under rank=8: every sum dense)."""
    m = _Lora(r=4)
    with pytest.warns(UserWarning, match=r"CompressedAccumulator\(rank=8\) compresses nothing here: each of its 2"):
        flora.CompressedAccumulator(m, rank=8, tau=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flora.CompressedAccumulator(_Lora(r=16), rank=8, tau=2)


def test_summary_shows_parameters_that_never_stepped():
    """The README sends a user whose optimizer was built on a meta model before to_empty()
    to summary(), 'which shows them as never stepped': it showed nothing of the kind (probe
    Z10). plan() says whether each parameter has a state, and where it lives."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    opt = flora.Flora(model.parameters(), lr=1e-3, beta1=0.9, rank=4)
    model.to_empty(device="cpu")
    for _ in range(2):
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
    assert [(r["stepped"], r["device"]) for r in opt.plan()] == [(False, "meta")] * 4
    text = opt.summary()
    assert "; 4 of them not stepped yet; 4 on the meta device" in text and "so build Flora after it" in text
    assert text.count(", not stepped yet") == 4
    built_after = flora.Flora(model.parameters(), lr=1e-3, beta1=0.9, rank=4)
    model(torch.randn(4, 16)).sum().backward()
    built_after.step()
    assert all(r["stepped"] and r["device"] == "cpu" for r in built_after.plan())
    assert "not stepped" not in built_after.summary() and "meta" not in built_after.summary()


def test_summary_counts_frozen_tensors_on_the_meta_device_too():
    """A meta-built model with a frozen part: to_empty() replaces the frozen tensors as
    well, so the count of tensors on the meta device takes them in (probe Z70: counting
    the trainable ones only had passed)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9).summary()
    assert "; 4 on the meta device" in text.splitlines()[0], text


def test_plan_gives_a_new_parameter_the_index_its_first_step_will():
    """A parameter put at position 0 after the others stepped: plan() said index 0, which
    the first parameter's state holds (probe Z10); its first step takes position + N."""
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    opt = flora.Flora([a, b], lr=1e-3, beta1=0.9, rank=2)
    (a.sum() + b.sum()).backward()
    opt.step()
    c = nn.Parameter(torch.randn(8, 8))
    opt.param_groups[0]["params"].insert(0, c)
    assert [r["index"] for r in opt.plan()] == [3, 0, 1]
    c.grad = torch.randn(8, 8)
    opt.step()
    assert opt.state[c]["index"] == 3 and [r["index"] for r in opt.plan()] == [3, 0, 1]


def test_relative_step_schedule_names_an_optimizer_that_is_not_floras():
    with pytest.raises(TypeError, match="takes a Flora optimizer with lr=None, got AdamW"):
        flora.RelativeStepSchedule(torch.optim.AdamW([nn.Parameter(torch.randn(2))]))


def test_plan_and_summary_name_parameters_given_by_name():
    """Built from named_parameters(), plan() and summary() labelled rows by index only (a
    probe on GPT-2 and ViT: hard to map); the names are torch's group['param_names']."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = flora.Flora(model.named_parameters(), lr=1e-3, rank=4, beta1=0.9)
    assert [r["name"] for r in opt.plan()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert "[0] 0.weight group 0 (16, 8): compressed" in opt.summary()
    assert [r["name"] for r in flora.Flora(model.parameters(), lr=1e-3).plan()] == [None] * 4


def test_peft_trainable_tokens_keep_the_padding_tokens_row_still():
    """(Probe Z31.) peft's trainable tokens keep a table of the chosen tokens' rows: with
    fewer rows than columns "auto" projected across them, and the padding token's row (no
    gradient) moved under the accumulator. A table holding the padding token projects its
    columns, as an embedding with padding_idx does: rows without a gradient stay still."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"],
                                            trainable_token_indices={"embed_tokens": [0, 1, 2, 3, 4, 5]}))
    name, delta = next((n, p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n)
    before = delta.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    acc = flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=opt)
    assert "padding_idx" in next(r for r in acc.plan() if r["name"] == name)["reason"]
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        ids = torch.randint(6, 64, (2, 8), generator=g)
        ids[:, 1:5] = torch.tensor([1, 2, 3, 4])
        ids[:, -2:] = 0  # padding; token 5 never used
        (model(input_ids=ids, labels=ids).loss / 2).backward()
        if i % 2:
            opt.step()
            opt.zero_grad()
    moved = (delta.detach() - before).abs().amax(dim=1)
    assert moved[0] == 0 and moved[5] == 0 and bool((moved[1:5] > 0).all())


def test_coordinate_projections_of_other_dims_and_non_tensor_arguments_are_named():
    """Mutation probe Z147's survivors: a 3-dim or 0-d index tensor (a 0-d one had given a
    (1, m) result from compress without a word), and transfer's a_new and c as lists."""
    a3 = torch.stack([make_projection("coordinates", s, 3, 10) for s in (0, 1)])[None]  # 1 x 2 x 3 int64
    with pytest.raises(ValueError, match=r"compress: the projection has shape \(1, 2, 3\) \(torch.int64\)"):
        compress(torch.randn(2, 10, 6), a3, 0)
    with pytest.raises(ValueError, match=r"compress: the projection has shape \(\) \(torch.int64\)"):
        compress(torch.randn(10, 6), torch.tensor(3), 0)
    with pytest.raises(ValueError, match=r"decompress: the projection has shape \(\) \(torch.int64\)"):
        decompress(torch.randn(1, 6), torch.tensor(3), 0, size=10)
    a = make_projection("gaussian", 0, 3, 10)
    with pytest.raises(TypeError, match=r"transfer: a_new must be a torch.Tensor .*got list"):
        transfer(torch.randn(3, 6), a, a.tolist(), 0)
    with pytest.raises(TypeError, match=r"transfer: c must be a torch.Tensor; got list"):
        transfer(torch.randn(3, 6).tolist(), a, a, 0)


def test_flora_state_bytes_counts_a_zero_dim_and_names_a_non_integer_one():
    from flora.memory import flora_state_bytes

    assert flora_state_bytes([(0, 5)], rank=2, beta1=0.9) == 20
    for shape in [(8.0, 8), (True, 8)]:
        with pytest.raises(ValueError, match="a shape must hold non-negative integers"):
            flora_state_bytes([shape], rank=2, beta1=0.9)
