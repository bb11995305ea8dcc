"""What each benchmark name builds: the options that reach the optimizer (probe Z82,
mutation testing of the bench's naming and building: a beta1, a kappa, a seed, a weight
decay, a peer's rank or scale, or the head left out of projection could change and every
other test passed, while the published rows measured something else)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora.bench import optimizers as bo


class _Model(nn.Module):
    """A projected linear layer and an output head (left to the plain group)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.lm_head = nn.Linear(16, 16), nn.Linear(16, 4)


class _Task:
    head_names = ("lm_head",)


def _group(opt, **having):
    (g,) = [g for g in opt.param_groups if all(g.get(k) == v for k, v in having.items())]
    return g


def test_the_plain_optimizers_get_the_options_their_names_say():
    params = [nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8))]

    def make(name):
        return bo.make_optimizer(bo.parse(name), params, 1e-3, kappa=7, seed=3)

    assert make("adamw").param_groups[0]["weight_decay"] == 0.0
    assert make("lora-r4").param_groups[0]["beta1"] == 0.9  # LoRA's Adafactor keeps a first moment
    g = make("flora-r4").param_groups[0]
    assert (g["rank"], g["beta1"], g["kappa"], g["seed"]) == (4, 0.9, 7, 3)


def test_flora_opt_rows_keep_a_first_moment():
    pytest.importorskip("flora_opt")
    opt = bo.make_optimizer(bo.parse("flora-opt-r4"), [nn.Parameter(torch.randn(16, 8))], 1e-3, kappa=7, seed=3)
    assert opt.defaults["beta1"] == 0.9


@pytest.mark.parametrize("name, module", [("galore-r4", "galore_torch"), ("apollo-r4", "apollo_torch")])
def test_galore_and_apollo_project_the_inner_linear_weights_every_kappa_steps(name, module):
    pytest.importorskip(module)
    built = bo.build(bo.parse(name), _Model(), 1e-3, task=_Task(), kappa=7, tau=2, seed=3)
    g = _group(built.optimizer, rank=4)
    assert (g["update_proj_gap"], g["scale"], len(g["params"])) == (7, 1.0, 1)  # a.weight alone
    assert len(_group(built.optimizer, weight_decay=0.0, rank=None)["params"]) == 3  # a.bias, the head
    assert bo.parse(name).lr_family == "adam"
    if name == "apollo-r4":
        assert (g["proj"], g["scale_type"]) == ("random", "channel")


def test_a_compressed_accumulation_row_accumulates_at_its_own_rank():
    built = bo.build(bo.parse("flora-r4+ca-r2"), _Model(), 1e-3, task=_Task(), kappa=7, tau=2, seed=3)
    assert built.accumulator.rank == 2 and built.optimizer.param_groups[0]["rank"] == 4


def test_the_suites_peers_are_built_as_documented():
    from flora.bench.suite import peers

    pytest.importorskip("apollo_torch")
    opt = peers.build("apollo-mini", _Model(), 1e-3, head_names=("lm_head",), dim=16, heads=2)
    g = _group(opt, rank=1)
    assert (g["scale"], g["scale_type"], g["proj"], len(g["params"])) == (128, "tensor", "random", 1)
    assert len(_group(opt, weight_decay=0.0, rank=None)["params"]) == 3  # the rest is trained too
    for name, module in (("adamw-8bit", "torchao"), ("adamw-8bit-bnb", "bitsandbytes")):
        pytest.importorskip(module)
        try:
            opt = peers.build(name, _Model(), 1e-3, head_names=("lm_head",), dim=16, heads=2)
        except peers.Unavailable:  # bitsandbytes without its CPU kernels: the suite marks it so
            continue
        assert opt.param_groups[0]["weight_decay"] == 0.0, name


def test_seed_statistics_and_the_forms_table_take_what_they_say():
    """A row's mean and std are over its finished seeds (a diverged seed's 9.0 had been
    averaged in); the forms table leaves out +ca rows (one label would hold two rows), shows
    the state's bytes (not the cache's), and compares ranks only where two or more ran
    (any, with --preset forms)."""
    from flora.bench import forms
    from flora.bench.records import RunResult
    from flora.bench.rows import Chosen

    def run(opt, seed, status="ok", test=1.0):
        return RunResult("finetune", opt, 1e-3, seed, status, val_loss=test, test_loss=test, state_bytes=1000,
                         cache_bytes=24)

    ok, diverged = run("flora-r8", 0), run("flora-r8", 1, "diverged", 9.0)
    chosen = Chosen(ok, [1e-3], "ok", runs=[ok, diverged])
    assert (chosen.get("test_loss"), chosen.get("test_loss_std")) == (1.0, None)
    rows = [Chosen(run(o, 0), [1e-3], "ok") for o in ("flora-r8", "flora-r8+ca-r4")]
    flat = forms.table(rows, {"finetune": "loss"})
    assert [(d["optimizer"], d["rank"], d["state_bytes"]) for d in flat] == [("flora-r8", 8, 1000)]
    assert forms.tasks_compared(flat) == [] and forms.tasks_compared(flat, "forms") == ["finetune"]
