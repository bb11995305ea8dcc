"""Fused mode across replicas (the optimizer steps inside backward), on 2 CPU processes
with gloo: under FSDP2 each unit's parameters step after its reduce-scatter, under DDP
each bucket steps in its communication hook. Every case equals one process on the full
batch (unfused, or fused where clipping is per parameter). The scenarios are in
dist_fused.py."""

import warnings

import pytest
import torch

import dist_fused as S
from _dist import check, spawn_once

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
              pytest.mark.slow]

SCENARIOS = ["fsdp_fused", "ddp_fused", "ddp_fused_accumulator_refused", "fused_scaler", "fused_resume",
             "ddp_fused_projection_hook", "fsdp_gradient_sync_off_refused", "ddp_fused_removed",
             "fused_layouts_dtypes", "fsdp_fused_unit_with_an_unused_parameter"]
TOL = 2e-5  # float32, 3 steps with resamples


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spawn_once(tmp_path_factory, "dist_fused", SCENARIOS)


@pytest.mark.parametrize("engine", ["fsdp_fused", "ddp_fused"])
@pytest.mark.parametrize("case", list(S.FUSED_CASES))
def test_fused_across_replicas_equals_one_process(results, engine, case):
    """Flora and AdamW, compressed (exact last micro-batch or not) and dense, clipped per
    parameter, with an LR scheduler; two cycles of tau=2 and a short one (finish_cycle):
    every rank's parameters equal one process's, and last_grad_norm is global."""
    for r in check(results, engine):
        got = r[case]
        assert got["diff"] <= TOL, got["diff"]
        if got["ref_norms"]:
            assert got["norms"] == pytest.approx(got["ref_norms"], rel=1e-5)


def test_fsdp2_fused_frees_every_gradient_and_counts_collectives(results):
    """No gradient is left after a cycle; the all-reduces come in the tau-th backward
    only, per unit (two units here): Flora's two, in whose first the norms ride, and
    one for the norms before them where clipping needs them first (AdamW: that one);
    Flora's first step adds one, the check that every rank has the same options."""
    for r in check(results, "fsdp_fused"):
        for case, (kind, kw) in S.FUSED_CASES.items():
            assert r[case]["grads_left"] == []
            per_unit = (2 + ("max_grad_norm" in kw)) if kind == "flora" else 1
            reduces = [c.get("c10d.allreduce_", 0) for c in r[case]["counts"]]
            first = 2 * per_unit + (kind == "flora")  # Flora here compresses (rank 3, beta1 0.9)
            assert reduces[:4] == [0, first, 0, 2 * per_unit], (case, reduces)


def test_ddp_fused_steps_several_buckets_and_leaves_no_gradient(results):
    for r in check(results, "ddp_fused"):
        for case in ("bucket_view", "adamw_bucket_view"):
            assert r[case]["diff"] <= TOL, (case, r[case]["diff"])
        for case, got in r.items():
            assert got["buckets"] >= 3, case
            assert got["grads_seen"] == [0] * len(got["grads_seen"]), case


def test_ddp_fused_refusals(results):
    for r in check(results, "ddp_fused_accumulator_refused"):
        assert r["hook"] and "comm_hook=(state, hook)" in r["hook"]
        assert r["find_unused"] and "find_unused_parameters=False" in r["find_unused"]
        assert r["static"] and "without static_graph=True" in r["static"]
        assert r["hook_free"] and r["find_unused_free"] and r["static_free"]


def test_fused_grad_scaler_across_replicas(results):
    """A NaN in one rank's loss skips the cycle's step on every rank and backs the scale
    off alike, as one process fused with the same NaN."""
    for r in check(results, "fused_scaler"):
        for case, got in r.items():
            assert got["diff"] <= TOL, (case, got["diff"])
            assert got["scales"] == got["ref_scales"] == [512.0, 256.0, 512.0], case


def test_fused_across_replicas_resumes_exactly_mid_cycle(results):
    for r in check(results, "fused_resume"):
        for engine in ("ddp", "fsdp"):
            assert r[engine]["diff"] == 0.0, (engine, r[engine]["diff"])
            assert r[engine]["micro_step_loaded"] == 1


def test_ddp_fused_with_projection_hook_equals_normal_mode_with_it(results):
    for r in check(results, "ddp_fused_projection_hook"):
        assert r["diff"] <= 1e-6 and r["moved"] > 1e-3


def test_comm_hook_outside_fused_ddp_is_refused():
    from torch import nn

    from flora import CompressedAccumulator, Flora

    model = nn.Linear(4, 4)
    opt = Flora(model.parameters(), lr=1e-2)
    for kw in (dict(fused=True), dict(fused=False)):
        with pytest.raises(ValueError, match="comm_hook applies to fused=True on a DistributedDataParallel"):
            CompressedAccumulator(model, rank=2, tau=2, optimizer=opt, comm_hook=(None, lambda s, bucket: None), **kw)


def test_fsdp2_gradient_sync_off_is_refused_at_the_forward(results):
    for r in check(results, "fsdp_gradient_sync_off_refused"):
        for fused in (False, True):
            assert r[fused] and "set_requires_gradient_sync(False)" in r[fused], r[fused]
            assert r[f"{fused}_eval"] == 0 and r[f"{fused}_after"] == 1
            assert r[f"{fused}_still_sharded"]  # nothing of FSDP2's forward ran (no collective left unwaited)


def test_fsdp2_fused_steps_a_unit_that_misses_a_gradient_on_its_own(results):
    for r in check(results, "fsdp_fused_unit_with_an_unused_parameter"):
        # the root unit (b, c, d; its unused matrix gets nothing) steps when a's first
        # gradient arrives: two all-reduces per unit, one more for the options at the first
        # step; merged with a's unit it had been one step of two all-reduces in all
        assert r["counts"] == [0, 5, 0, 4], r["counts"]
        assert r["diff"] <= TOL, r["diff"]


def test_ddp_fused_after_remove_says_so_and_the_model_is_freed(results):
    for r in check(results, "ddp_fused_removed"):
        for case in ("full", "mid", "short"):
            assert r[case] and "wrap the module in a new DistributedDataParallel" in r[case], (case, r[case])
        assert r["freed"]


@pytest.mark.parametrize("case", [f"{e}_{n}" for e in ("ddp", "fsdp") for n in S.LAYOUT_CASES
                                  if not (e == "fsdp" and n.endswith("channels_last"))])
def test_fused_across_replicas_over_layouts_and_dtypes(results, case):
    """DDP's buckets (channels_last: DDP lays the gradient out with the parameter's strides
    there, whatever bucket.gradients() shows) and FSDP2's shards, in float32, bfloat16 and
    float64, with clipping and a short cycle, against one process fused: the error
    relative to the parameters' movement (bfloat16: a rounding of the movement; the
    reductions over replicas are ordered differently)."""
    tol = {"bfloat16": 0.2, "float64": 1e-6}.get(case.split("_", 1)[1], 1e-4)
    for r in check(results, "fused_layouts_dtypes"):
        assert r[case]["moved"] > 1e-3
        assert r[case]["relative"] <= tol, (case, r[case])
