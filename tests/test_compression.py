"""The one rule for which tensors are compressed and along which dim, and that the
optimizer, the accumulator and the state formula all follow it."""

import pytest
import torch
from torch import nn

import flora
from flora.compression import compressed_dim, dense_reason

RULE = [  # shape, rank, options, projected dim (None: dense), reason fragment
    ((16, 32), 8, {}, 0, None),
    ((32, 16), 8, {}, 1, None),
    ((16, 16), 8, {}, 1, None),  # a tie projects the columns
    ((16, 8), 8, {}, None, "projected dim 8 <= rank 8"),
    ((16,), 4, {}, None, "1-D"),
    ((), 4, {}, None, "0-D"),
    ((100, 8), 4, {}, 1, None),  # embeddings are compressed by default
    ((100, 8), 4, {"max_aspect_ratio": 4.0}, None, "aspect ratio 12.5"),
    ((8, 3, 3, 3), 4, {}, 0, None),  # a convolution is viewed as 8 x 27
    ((16, 32), 8, {"proj_dim": 1}, 1, None),
    # stacked experts (E, n, m), n and m >= E: a stack of E matrices (E * n) x m, whose
    # columns are projected (its rows would mix the experts), even where E * n > m
    ((8, 24, 32), 8, {}, 1, None),
    ((4, 48, 12), 8, {}, 1, None),
    ((4, 24, 8), 8, {}, None, "projected dim 8 <= rank 8"),
    ((4, 10, 40), 8, {"max_aspect_ratio": 3.0}, None, "aspect ratio 4"),  # one matrix's, not (40, 40)'s
    ((4, 30, 40), 8, {"max_aspect_ratio": 3.0}, 1, None),
    ((8, 24, 32), 8, {"proj_dim": 0}, 0, None),  # asked for: the (E * n) rows
    ((64, 24, 32), 8, {}, 0, None),  # more experts than rows: not a stack, 64 x 768 as before
    # one matrix behind leading dims of 1 (ViT's (1, N, d) position embeddings, (1, 1, d)
    # class tokens): that matrix, as its 2-D shape is (it took the columns, as a stack)
    ((1, 17, 32), 8, {}, 0, None),
    ((1, 1, 32), 8, {}, None, "projected dim 1 <= rank 8"),
    ((1, 5, 32), 8, {}, None, "projected dim 5 <= rank 8"),
    ((1, 1, 40, 24), 8, {}, 1, None),
    ((1, 4, 24, 32), 8, {}, 1, None),  # a stack of 4 behind a 1
    ((16, 32), None, {}, None, "rank=None"),
    # "sharded": FSDP2's "auto" on any tensor (probe Z91): the columns where they compress,
    # the rows of one matrix behind leading 1s, "auto" where the columns do not compress
    ((16, 32), 8, {"proj_dim": "sharded"}, 1, None),
    ((32, 16), 8, {"proj_dim": "sharded"}, 1, None),
    ((32, 8), 8, {"proj_dim": "sharded"}, None, "projected dim 8 <= rank 8"),
    ((8, 3, 3, 3), 4, {"proj_dim": "sharded"}, 1, None),
    ((8, 24, 32), 8, {"proj_dim": "sharded"}, 1, None),
    ((1, 17, 32), 8, {"proj_dim": "sharded"}, 0, None),
    ((1, 17, 32), 20, {"proj_dim": "sharded"}, None, "projected dim 17 <= rank 20"),
    ((1, 1, 32), 8, {"proj_dim": "sharded"}, None, "projected dim 1 <= rank 8"),
    ((16,), 4, {"proj_dim": "sharded"}, None, "1-D"),
    ((16, 32), None, {"proj_dim": "sharded"}, None, "rank=None"),
]


@pytest.mark.parametrize("shape,rank,opts,dim,reason", RULE)
def test_rule(shape, rank, opts, dim, reason):
    assert compressed_dim(shape, rank, **opts) == dim
    got = dense_reason(shape, rank, **opts)
    assert (got is None) if reason is None else (reason in got)


def test_optimizer_accumulator_and_formula_follow_the_rule():
    model = nn.ModuleDict(dict(emb=nn.Embedding(100, 8), conv=nn.Conv2d(3, 8, 3), fc=nn.Linear(8, 16),
                               head=nn.Linear(16, 8, bias=False)))
    model.register_parameter("pos", nn.Parameter(torch.zeros(1, 17, 32)))  # ViT's position embeddings
    model.register_parameter("cls", nn.Parameter(torch.zeros(1, 1, 32)))  # and class token
    opts = dict(rank=4, max_aspect_ratio=10.0)
    want = [compressed_dim(tuple(p.shape), **opts) for p in model.parameters()]
    assert want.count(None) < len(want) and want.count(None) > 0  # the model exercises both branches
    opt = flora.Flora(model.parameters(), lr=1e-3, beta1=0.9, **opts)
    acc = flora.CompressedAccumulator(model, **opts, tau=2)
    assert [r.get("proj_dim") for r in opt.plan()] == want
    assert [r.get("proj_dim") for r in acc.plan()] == want
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert flora.state_bytes(opt) == flora.flora_state_bytes(shapes, beta1=0.9, **opts)


def test_state_formula_refuses_unknown_options():
    with pytest.raises(TypeError, match="max_aspect_ration"):
        flora.flora_state_bytes([(4, 4)], rank=2, beta1=0.9, max_aspect_ration=2.0)
    assert flora.flora_state_bytes([(4, 4)], rank=2, beta1=0.9, dtype=torch.float64) == 8 * (4 + 4 + 2 * 4)


def test_stacked_experts_are_projected_each_on_its_own():
    """Stacked experts (one (E, n, m) parameter, as transformers 5's MoE models hold
    them) were viewed as E x (n * m) and projected across the experts: an expert the
    router never picked moved by the others' momentum (16 experts of 24 x 32 at rank 8,
    4 routed: the others moved by 29% of the routed ones' distance), and with E <= rank
    the tensor stayed dense. Each expert's rows are now compressed by one shared
    projection of the columns: the momentum is (E * n) x r, and experts without gradient
    stay exactly where they were, in the optimizer and in the accumulator."""
    from flora.projection import is_stack, matrix_shape

    assert is_stack((16, 24, 32)) and matrix_shape((16, 24, 32)) == (384, 32)
    assert not is_stack((64, 3, 3)) and not is_stack((8, 4, 3, 3)) and not is_stack((24, 32))
    for experts in (8, 16):
        w = nn.Parameter(torch.randn(experts, 24, 32, generator=torch.Generator().manual_seed(0)) * 0.02)
        opt = flora.Flora([w], lr=1e-2, rank=8, beta1=0.9, kappa=2, scale_parameter=False)
        acc = flora.CompressedAccumulator([w], rank=8, tau=2)
        assert opt.plan()[0]["momentum_shape"] == (experts * 24, 8) and acc.plan()[0]["buffer_shape"] == (experts * 24, 8)
        before = w.detach().clone()
        g = torch.Generator().manual_seed(1)
        for _ in range(5):  # two resamples; experts 0-3 routed
            for _ in range(2):
                x = torch.randn(4, 3, 24, generator=g)
                (x @ w[:4]).square().sum().backward()
            opt.step()
            opt.zero_grad()
        moved = (w.detach() - before).flatten(1).norm(dim=1)
        assert (moved[:4] > 0.05).all()
        assert torch.equal(moved[4:], torch.zeros(experts - 4))
        assert flora.state_bytes(opt) == flora.flora_state_bytes([tuple(w.shape)], rank=8, beta1=0.9)


def test_a_checkpoint_of_stacked_experts_from_the_old_view_is_refused_clearly():
    """A state saved when a stack was one E x (n * m) matrix cannot be read under the new
    view: the refusal says so (not 'saved from a different model or rank'), and nothing is
    loaded."""
    w = nn.Parameter(torch.randn(16, 24, 32))
    opt = flora.Flora([w], lr=1e-2, rank=8, beta1=0.9)
    w.grad = torch.randn_like(w)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_c"] = torch.zeros(8, 24 * 32, dtype=torch.bfloat16)  # the old view, dim 0
    sd["state"][0]["proj_dim"] = 0
    new = flora.Flora([w], lr=1e-2, rank=8, beta1=0.9)
    with pytest.raises(ValueError, match=r"stack of matrices of shape \(16, 24, 32\).*before 2026-12-04"):
        new.load_state_dict(sd)
    assert not new.state


def test_a_stack_saved_with_a_dense_momentum_loads_with_a_warning():
    """Before 2026-12-04 a stack of no more matrices than the rank (Mixtral's 8 experts)
    stayed dense; such a checkpoint loads, keeps its dense momentum (a momentum is never
    compressed mid-run) and says so (it loaded silently: found by a new-user probe)."""
    w = nn.Parameter(torch.randn(8, 24, 32))
    old = flora.Flora([w], lr=1e-2, rank=8, beta1=0.9)
    w.grad = torch.randn_like(w)
    old.step()
    sd = old.state_dict()
    st = sd["state"][0]
    st["exp_avg"] = torch.zeros(8, 24, 32, dtype=torch.bfloat16)  # as the old rule kept it
    for k in ("exp_avg_c", "proj_dim", "proj_count", "proj_age"):
        st.pop(k, None)
    new = flora.Flora([w], lr=1e-2, rank=8, beta1=0.9)
    with pytest.warns(UserWarning, match=r"1 stack\(s\) of matrices .*\(8, 24, 32\)\) hold a dense momentum"):
        new.load_state_dict(sd)
    new.step()
    assert new.state[w]["exp_avg"].shape == (8, 24, 32) and "exp_avg_c" not in new.state[w]
