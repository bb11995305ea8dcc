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
    ((16, 32), None, {}, None, "rank=None"),
]


@pytest.mark.parametrize("shape,rank,opts,dim,reason", RULE)
def test_rule(shape, rank, opts, dim, reason):
    assert compressed_dim(shape, rank, **opts) == dim
    got = dense_reason(shape, rank, **opts)
    assert (got is None) if reason is None else (reason in got)


def test_optimizer_accumulator_and_formula_follow_the_rule():
    model = nn.ModuleDict(dict(emb=nn.Embedding(100, 8), conv=nn.Conv2d(3, 8, 3), fc=nn.Linear(8, 16),
                               head=nn.Linear(16, 8, bias=False)))
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
