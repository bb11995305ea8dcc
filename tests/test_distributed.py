"""Flora under torch's own engines, on 2 CPU processes with gloo: FSDP2 (fully_shard) and
DDP equal one process; the collectives of a sharded step are counted; checkpoints move
between 2 processes and 1 with torch.distributed.checkpoint; accelerate's FSDP2 parameter
swap; DeepSpeed ZeRO partitions and FSDP1's sharded pieces are refused. The scenarios are in dist_scenarios.py."""

import os

import pytest
import torch
from torch import nn

import dist_scenarios as S
from _configs import extended
from _dist import check, spawn, spawn_once
from flora import Flora

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

SCENARIOS = ["fsdp_equals_one_process", "fsdp_forms_equal_single_tensor", "fsdp_nonfinite_gradient", "fsdp_compile_option",
             "fsdp_shard1_refused", "fsdp_uneven_stack_refused", "fsdp_seed_per_rank_refused", "fsdp_options_disagree_refused",
             "fsdp_loads_one_process_state", "hsdp_equals_one_process",
             "accelerate_switch", "ddp_flora", "ddp_accumulator",
             "ddp_accumulator_sync_refused", "ddp_wrapper_found_when_alive", "ddp_unused_wrapper_alive", "ddp_accumulator_accelerate_short_cycle", "ddp_accumulator_accelerate_one_batch", "ddp_accumulator_short_cycle",
             "ddp_accumulator_find_unused", "ddp_accumulator_find_unused_resume",
             "fsdp_accumulator", "fsdp1", "fsdp_damaged_shard_refused_everywhere", "fsdp_accumulator_unfrozen",
             "fsdp_one_matrix_auto", "fsdp_stack_checkpoint_refused_before_any_change",
             "fsdp_options_compared_again_after_an_edit", "fsdp_empty_parameter", "fsdp_plan_before_first_step",
             "zero_checkpoint"]
TOL = 2e-5  # float32, over 5 steps with two resamples (kappa=2)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_once(tmp_path_factory, "dist_scenarios", SCENARIOS)


@pytest.mark.parametrize("case", list(S.FSDP_CASES))
def test_fsdp2_equals_one_process(results, case):
    """Training end to end (FSDP2's backward and reduce-scatter): every rank's full
    parameters after 5 steps equal one process's single-tensor step (foreach=False; the
    reference uses the proj_dim the sharded run used): uneven (6 + 5 rows) and empty
    (1 + 0) shards, a 3-D parameter (factored over its sharded dim 0 and dim 1 by
    default, per index of dim 0 with factor_dims="last"), 1-D ones; rank=None, proj_dim 0
    and 1, "auto", no momentum, relative step."""
    for r in check(results, "fsdp_equals_one_process"):
        assert r[case]["diff"] <= TOL, (case, r[case]["diff"])


@pytest.mark.parametrize("case", list(S.FORM_CASES))
def test_fsdp2_form_and_projection_equals_single_tensor_reference(results, case):
    """Every (form, projection) pair, and bf16 parameters: FSDP2 fed the same gradients as
    one process's single-tensor step moves every rank's rows as it does, to 1e-4 of the
    movement (plus two units in the last place for bf16, which rounds every step), with
    the same state (float32); each case projects the sharded rows away in one param
    group (A_local u_local summed) and the unsharded columns in the other (the terms
    summed); shards uneven and empty, 2-D, 3-D and 4-D (channels_last in the reference),
    factored over the sharded rows and another dim (summed over the shards) or over two
    other dims (a permuted view, local)."""
    dtype = S.FORM_CASES[case][0]
    for r in check(results, "fsdp_forms_equal_single_tensor"):
        assert r["counts"] == [{"c10d.allreduce_": 2}]  # every case, one step: two all-reduces
        res = r[case]
        assert len(res["params"]) == len(S.Params.SHAPES)
        for name, m in res["params"].items():
            assert m["dtype"] == str(dtype), name
            if m["scale"] is None:  # no rows on this rank
                continue
            # lr is 0.2 x RMS(p) (about 6e-3) a step; "paper" on orthonormal rows moves least
            assert m["scale"] > 5e-4, (name, "the reference hardly moved: the comparison would prove nothing")
            assert m["ulps"] < 0.2, name  # the allowance for rounding is far below the movement
            assert m["err"] <= 1e-4, (name, m)
        # the first moment's storage: the default "auto" is bfloat16 in these groups (a rank, float32 state)
        narrow = S.FORM_CASES[case][1].get("momentum_dtype", "bfloat16")
        narrow = getattr(torch, narrow) if isinstance(narrow, str) else narrow
        narrow = {"exp_avg": narrow, "exp_avg_c": narrow}
        for name, state in res["state"].items():
            assert len(state) > 2, name
            for k, v in state.items():
                if isinstance(v, dict):
                    want = str(narrow[k]) if narrow.get(k) is not None else "torch.float32"
                    assert v["dtype"] == want and v["shape"] and v["err"] <= 1e-5, (name, k, v)
                else:
                    assert v is True, (name, k)


def test_fsdp2_factor_dims_edited_mid_run_is_refused(results):
    for r in check(results, "fsdp_forms_equal_single_tensor"):
        edit = r["factor_dims_edit"]
        assert edit is not None, "a group's factor_dims edited mid-run stepped FSDP2 parameters"
        assert "factor_dims='last' does not fit" in edit["message"] and edit["unchanged"]


def test_fsdp2_step_is_two_all_reduces(results):
    """The design: one all-reduce of the second moment's sums (and |p|^2) before the update
    exists, one of |u|^2 and the momentum's terms after; nothing else, every step but the
    first, which checks that every rank has the same options (one more all-reduce; before
    2026-12-05 only the seed, and only where there are projections)."""
    for r in check(results, "fsdp_equals_one_process"):
        for case, res in r.items():
            assert res["counts"] == [{"c10d.allreduce_": 3}] + [{"c10d.allreduce_": 2}] * (S.STEPS - 1), case


def test_fsdp2_state_is_sharded_where_the_rows_are(results):
    r = check(results, "fsdp_equals_one_process")[0]
    auto = r["auto"]["state"]
    w = auto["a.weight"]  # 11 x 12, "auto" under FSDP2: the unsharded columns are projected away
    assert w["proj_dim"] == 1
    assert w["exp_avg_c"] == ("DTensor", "(Shard(dim=0),)")
    assert w["exp_avg_sq_row"] == ("DTensor", "(Shard(dim=0),)")
    assert w["exp_avg_sq_col"] == ("DTensor", "(Replicate(),)")  # a sum over every shard's rows
    assert auto["a.bias"]["exp_avg"] == ("DTensor", "(Shard(dim=0),)")
    c = auto["c"]  # (5, 4, 3), factor_dims="largest": over dims (0, 1), the view (3, 5, 4)
    assert c["exp_avg_sq_row"] == ("DTensor", "(Shard(dim=1),)")  # (3, 5): the rows are its last dim
    assert c["exp_avg_sq_col"] == ("DTensor", "(Replicate(),)")  # (3, 4): a sum over every shard's rows
    c = r["factor_last"]["state"]["c"]  # factor_dims="last": per index of dim 0, both factors follow the rows
    assert c["exp_avg_sq_row"] == ("DTensor", "(Shard(dim=0),)")
    assert c["exp_avg_sq_col"] == ("DTensor", "(Shard(dim=0),)")
    dim0 = r["proj_dim0"]["state"]["a.weight"]
    assert dim0["proj_dim"] == 0 and dim0["exp_avg_c"] == ("DTensor", "(Replicate(),)")
    for case in r.values():
        for name, kinds in case["state"].items():
            for key, (stride, full) in kinds["strides"].items():
                assert stride == full, (name, key, stride, full)
    assert r["auto"]["state"]["a.weight"]["strides"]["exp_avg_c"][0] == (3, 1)  # 11 x 3, contiguous


def test_hsdp_equals_one_process(results):
    for r in check(results, "hsdp_equals_one_process"):
        for case, diff in r.items():
            assert diff <= TOL, (case, diff)


def test_fsdp2_nonfinite_gradient_on_one_rank_skips_the_parameter_everywhere(results):
    for r in check(results, "fsdp_nonfinite_gradient"):
        state = r.pop("a_state_unchanged")
        assert r == {"a_unchanged": True, "b_moved": True, "skips": 1, "finite": True}
        assert "exp_avg_c" in state and "exp_avg_sq_row" in state and all(state.values()), state


def test_fsdp2_counts_an_empty_parameter_without_a_false_skip(results):
    for r in check(results, "fsdp_empty_parameter"):
        assert r["skips"] == 0 and r["e_steps"] == 2 and r["diff"] <= TOL, r


def test_fsdp2_with_the_compile_option_steps_eagerly_and_says_so(results):
    for r in check(results, "fsdp_compile_option"):
        assert r == {"equal": True, "warnings": 1, "fused_warnings": 1}


def test_fsdp2_shard1_is_refused_before_any_change(results):
    for r in check(results, "fsdp_shard1_refused"):
        for how in ("fsdp", "tp"):  # FSDP2's shard_placement_fn, tensor parallelism's RowwiseParallel
            got = r[how]
            assert got["error_message"] and "Shard(dim=1)" in got["error_message"] and "dim 0" in got["error_message"]
            assert "shard_placement_fn" in got["error_message"] and "RowwiseParallel" in got["error_message"]
            assert got["unchanged"] and got["state_empty"], how


def test_fsdp2_refuses_stacked_experts_that_do_not_divide_among_the_ranks(results):
    for r in check(results, "fsdp_uneven_stack_refused"):
        got = r["3"]
        assert got["error_message"] and "stack of matrices of shape (3, 6, 5)" in got["error_message"], got
        assert "rank=None" in got["error_message"] and got["unchanged"]
        assert "a convolution kernel whose spatial dims are its largest" in got["error_message"]  # they are stacks too (Z113)
        assert r["None"] == {"error_message": None, "moved": True}


def test_fsdp2_compares_the_options_again_after_an_edit(results):
    for r in check(results, "fsdp_options_compared_again_after_an_edit"):
        first, plain, *edited = r["allreduces"]
        assert first == plain + 1 and edited == [plain + 1] * 3, r  # the check: at the first step, after each edit
        assert r["records"] == 1


def test_fsdp2_steps_one_matrix_behind_leading_ones_with_auto(results):
    for r in check(results, "fsdp_one_matrix_auto"):
        assert r["proj_dims"] == [0, 0, 1] and r["diff"] <= TOL and r["edit"] == "stepped", r


def test_fsdp2_plan_before_the_first_step_says_what_the_step_makes(results):
    for r in check(results, "fsdp_plan_before_first_step"):
        assert r["before"] == r["after"], r
        assert [v for v in r["after"].values() if v[0]], r  # something is compressed


def test_fsdp2_refuses_a_stack_checkpoint_whose_rows_cannot_follow_before_any_change(results):
    for r in check(results, "fsdp_stack_checkpoint_refused_before_any_change"):
        assert r["saved_proj_dim"] == 1
        said = r["refusal"]
        assert said and "stack of matrices of shape (3, 6, 5)" in said and "in the checkpoint" in said
        assert "sharded over 2 ranks" in said and "drop its entry" in said
        assert r["state_after"] == 0 and r["stepped"] == 1


def test_fsdp2_refuses_a_seed_that_differs_across_ranks_before_any_change(results):
    for r in check(results, "fsdp_seed_per_rank_refused"):
        for how in ("step", "step_parameters"):
            assert r[how] and "the processes disagree on seed (from 0 to 1; this process: " in r[how], r
            assert r[how + "_unchanged"] and r[how + "_then_steps"]


def test_fsdp2_and_hsdp_refuse_options_that_differ_across_ranks_before_any_change(results):
    """kappa, the form or the rank on one rank only (FSDP2), a per-rank seed under HSDP:
    refused on every rank at the first step, nothing changed; HSDP with one seed steps and
    its replicas agree; the accumulator with a per-rank seed is refused when built."""
    r0, r1 = check(results, "fsdp_options_disagree_refused")
    for r in (r0, r1):
        for name, words in (("kappa", "kappa (from 1 to 2;"), ("momentum_form", "momentum_form (this process: "),
                            ("rank", "rank (from 3 to 4;"), ("hsdp seed", "seed (from 0 to 1;"),
                            ("beta1 high half", "beta1 (this process: "), ("beta1 none", "beta1 (this process: "),
                            ("hsdp shards seed", "seed (from 0 to 1;")):
            assert r[name] and "the processes disagree on " + words in r[name], (name, r[name])
            assert r[name + " unchanged"], name
        assert r["hsdp same seed"] is None
        for name in ("accumulator fsdp seed", "accumulator hsdp seed"):
            assert r[name] and "CompressedAccumulator on a device mesh of 2 processes: the processes disagree on " \
                "seed (from 0 to 1;" in r[name], r[name]
    for a, b in zip(r0["hsdp params"], r1["hsdp params"]):
        assert torch.equal(a, b)


def test_fsdp2_resumes_a_one_process_state_or_refuses_a_merged_one(results):
    for r in check(results, "fsdp_loads_one_process_state"):
        assert r["plain"] <= TOL and r["full"] <= TOL, r
        assert "both a dense (exp_avg) and a compressed (exp_avg_c) first moment" in r["merged"], r
        assert "holds DTensors (a sharded optimizer's opt.state_dict(), FSDP2), but this parameter is a plain " \
            "tensor" in r["back"] and r["back_state"] == 0, r
        assert r["back_whole"] <= TOL, r


def test_accelerate_fsdp2_parameter_swap(results):
    for r in check(results, "accelerate_switch"):
        assert r["diff"] <= TOL


def test_ddp_equals_one_process(results):
    for r in check(results, "ddp_flora"):
        assert r["diff"] <= TOL


def test_zero_redundancy_optimizer_checkpoint_resumes_in_zero_and_in_one_process(results):
    """(Probe Z131.) ZeroRedundancyOptimizer(optimizer_class=Flora): the replicas equal;
    its consolidated checkpoint (one index twice: each rank's local positions start at 0)
    resumes bit for bit in a fresh ZeRO, and one process's Flora loads it and continues the
    run to float tolerance, as docs/distributed.md says."""
    got = check(results, "zero_checkpoint")
    for r in got:
        assert all(torch.equal(a, b) for a, b in zip(r["whole"], got[0]["whole"]))  # the replicas
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"], r["whole"]))
        assert max((a - b).abs().max().item() for a, b in zip(r["one_process"], r["whole"])) <= TOL
        assert len(set(r["indices"])) < len(r["indices"])  # (the case this guards: one index twice)


def test_fsdp1_sharded_pieces_are_refused_and_no_shard_equals_one_process(results):
    """FSDP1's FlatParameter (use_orig_params=False) and its sharded 1-D shares of the model's
    own parameters (use_orig_params=True) are refused when Flora is built, pointing to FSDP2,
    and at the step of a Flora built before FSDP1 sharded them; NO_SHARD with
    use_orig_params=True keeps the shapes and equals one process."""
    for r in check(results, "fsdp1"):
        assert r["flat"] and "FlatParameter" in r["flat"] and "use_orig_params=False" in r["flat"]
        assert r["orig"] and "sharded parameters" in r["orig"] and "use_orig_params=True" in r["orig"]
        assert all("fully_shard" in m for m in (r["flat"], r["orig"]))
        # a Flora built before FSDP1 sharded the model's parameters: refused at its step, unchanged
        assert r["built_before"] and "sharded parameters" in r["built_before"]
        assert r["built_before_unchanged"] and r["built_before_no_state"]
        assert r["no_shard_diff"] <= TOL
        # CompressedAccumulator on FSDP1's pieces sums them densely (exact) and says it saves nothing
        for key in ("acc_flat", "acc_orig"):
            assert len(r[key]) == 1 and "FSDP1" in r[key][0] and "fully_shard" in r[key][0], r[key]


def test_ddp_compressed_accumulator_with_no_sync_equals_one_process(results):
    for r in check(results, "ddp_accumulator"):
        assert r["diff"] <= TOL


def test_ddp_compressed_accumulator_without_no_sync_is_refused_clearly(results):
    """Normal mode, DDP synchronising an early micro-batch: a message naming no_sync() and
    fused=True, before anything changes; the same model then run properly equals one
    process."""
    for r in check(results, "ddp_accumulator_sync_refused"):
        for where in ("module", "ddp", "wrapped_after"):
            msg = r[where]
            assert "micro-batch 1 of the cycle's 2" in msg and "ddp_model.no_sync()" in msg, msg
            assert "fused=True" in msg and "refers to a single memory location" not in msg, msg
            assert r[where + "_untouched"], where
        assert "this forward pass" in r["module"] and "Nothing of this forward pass ran" in r["ddp"]
        assert "this backward pass" in r["wrapped_after"]
        assert r["module_diff"] <= TOL and r["ddp_diff"] <= TOL
        assert "static_graph=True" in r["static"] and "Nothing of this forward pass ran" in r["static"], r["static"]
        assert r["static_untouched"]


def test_an_accumulator_on_a_module_finds_the_live_ddp_wrapper_only(results):
    """A DDP wrapper dropped but not yet collected neither guards an accumulator built on
    its module nor refuses fused=True there; the live one is found."""
    for r in check(results, "ddp_wrapper_found_when_alive"):
        assert r == {"dropped_guarded": False, "fused_backward_ran": True, "live_guarded": True}


def test_a_ddp_wrapper_alive_but_unused_changes_nothing(results):
    """An uncalled DDP wrapper of the module (a notebook's output history), made before the
    accumulator or after it, leaves normal-mode accumulation on the module, a short last
    cycle included (which is not averaged over its replicas), as it is without it; a removed fused accumulator kept in a
    variable does not keep its DDP model alive (probe Z124)."""
    for r in check(results, "ddp_unused_wrapper_alive"):
        assert r["diff_before"] == 0.0 and r["diff_after"] == 0.0, r
        assert r["fused_after_removed"] == "ran", r["fused_after_removed"]


def test_ddp_compressed_accumulator_lets_accelerate_end_a_short_cycle(results):
    """The guard against an early synchronised micro-batch lets through the one where
    accelerate ends a short cycle (end of data); both cycles equal one process."""
    for r in check(results, "ddp_accumulator_accelerate_short_cycle"):
        assert r["cycles"] == (2, 2)
        assert r["diff"] <= TOL


def test_ddp_compressed_accumulator_follows_accelerate_over_a_dataloader_of_one_batch(results):
    """accelerate's accumulate() over a dataloader of one batch per epoch: every cycle is one
    synchronised micro-batch, let through and closed there (probe Z107), equal to one
    process over three epochs with clipping."""
    for r in check(results, "ddp_accumulator_accelerate_one_batch"):
        assert r["cycles"] == (3, 3)
        assert r["diff"] <= TOL


def test_ddp_compressed_accumulator_averages_a_short_cycle_closed_by_the_step(results):
    """An epoch's short last cycle, run under no_sync() and closed by the step, is
    averaged over the replicas (it had been left local: the replicas drifted apart) and
    equals one process."""
    for r in check(results, "ddp_accumulator_short_cycle"):
        assert r["diff"] <= TOL


def test_ddp_find_unused_parameters_head_used_in_some_micro_batches_equals_one_process(results):
    """DDP(find_unused_parameters=True), normal mode: a head that the cycle's synchronised
    micro-batch does not reach (on every rank or on one), or reaches on one rank only,
    trains as in one process; with exact_last=True in the mixed case (not comparable to
    one process, see the scenario) the replicas agree."""
    r0, r1 = check(results, "ddp_accumulator_find_unused")
    for case, got in r0.items():
        assert got["aux moved"] > 1e-3, case
        for a, b in zip(got["params"], r1[case]["params"]):
            assert torch.equal(a, b), case
        if case != "mixed, rank=3, exact_last=True":
            assert got["diff"] <= TOL, (case, got["diff"])
    assert len(r0) == 7


def test_ddp_find_unused_parameters_mid_cycle_resume_is_bit_exact(results):
    """DDP(find_unused_parameters=True), normal mode, resumed mid-cycle into fresh objects:
    a head used only before the save (on both ranks or one), or before it on one rank and
    after it on the other, and not in the synchronised micro-batch, ends as in the run
    that never stopped, bit for bit, and the replicas agree (probe Z17: the fresh DDP left
    the head's estimate unaveraged; off by 1e-4 to 1e-3 and the replicas drifted)."""
    r0, r1 = check(results, "ddp_accumulator_find_unused_resume")
    assert len(r0) == 18  # 12 with Flora, 6 with SGD
    for case, got in r0.items():
        for a, b, c in zip(got["whole"], got["resumed"], r1[case]["resumed"]):
            assert torch.equal(a, b), (case, (a - b).abs().max().item())
            assert torch.equal(b, c), case


def test_fsdp2_compressed_accumulator_equals_one_process(results):
    for r in check(results, "fsdp_accumulator"):
        for case in ("exact_last=True", "exact_last=False"):
            assert r[case]["diff"] <= TOL, (case, r[case]["diff"])
            plan = r[case]["plan"]
            assert plan["a.weight"] == 1 and plan["c"] == 1  # the unsharded columns, compressed locally
            # plan()'s buffer_shape is the partial sum this rank holds: its rows by rank 3 (a probe:
            # it had given the global rows)
            for name, (buf, rows) in r[case]["buffers"].items():
                assert buf == [rows[0], 3], (name, buf, rows)
        errors = r["errors"]
        assert "unsharded columns" in errors["{'proj_dim': 0}"]
        assert "FSDP2" in errors["{'reduce': True}"]


def test_fsdp2_accumulator_refuses_or_warns_of_a_parameter_unfrozen_after_it_was_built(results):
    for r in check(results, "fsdp_accumulator_unfrozen"):
        for on, name in (("root", "b.weight"), ("submodule", "bias")):
            fused, normal = r[f"fused=True {on}"], r[f"fused=False {on}"]
            assert fused["quiet"] and normal["quiet"], on
            assert fused["error"] is not None and f"not given to the accumulator ({name}" in fused["error"], on
            assert normal["error"] is None and len(normal["warned"]) == 1 and name in normal["warned"][0], on


# ------------------------------------------------------------------ checkpoints


def test_fsdp2_a_shard_damaged_on_one_rank_is_refused_on_every_rank(results):
    r0, r1 = check(results, "fsdp_damaged_shard_refused_everywhere")
    assert "holds non-finite" in r1["nan"]["message"] and "every process refuses" in r1["nan"]["message"]
    assert "another process's shard" in r0["nan"]["message"]
    assert "must be a floating-point tensor" in r1["dtype"]["message"]
    assert "another process refused this load" in r0["dtype"]["message"]
    for r in (r0, r1):
        assert "different numbers of the sharded parameters" in r["dropped"]["message"]
        assert "states for different sharded parameters" in r["swapped"]["message"]
        assert all(r[case]["unchanged"] for case in ("nan", "dtype", "dropped", "swapped")) and r["finite"]


def _one_process(opts, batches, start, stop, ckpt_in=None, ckpt_out=None):
    model = S._net()
    opt = Flora(model.parameters(), **opts)
    if ckpt_in:
        S._dcp_load(model, opt, ckpt_in)
    for x, y in batches[start:stop]:
        opt.zero_grad()
        S._loss(model, x, y).backward()
        opt.step()
    if ckpt_out:
        S._dcp_save(model, opt, ckpt_out)
    return model


@pytest.mark.parametrize("momentum_dtype", [None, extended("none")])
def test_checkpoint_moves_between_two_processes_and_one(tmp_path, monkeypatch, momentum_dtype):
    """torch.distributed.checkpoint: 2 processes save after 3 steps, 1 process loads and
    finishes; 1 process saves after 3 steps, 2 processes load and finish. Both equal a run
    that never stopped. One process uses proj_dim=1, the dimension "auto" takes under
    FSDP2: DCP loads into tensors the loading optimizer allocates. At the default (the
    momentum stored in bfloat16, loaded as bfloat16) and, with FLORA_TEST_ALL=1,
    momentum_dtype=None (float32)."""
    monkeypatch.setenv("FLORA_TEST_CKPT", str(tmp_path))
    if momentum_dtype:
        monkeypatch.setenv("FLORA_TEST_MOMENTUM_DTYPE", momentum_dtype)
    batches = S._batches()
    opts = {**S.ckpt_opts(), "proj_dim": 1}
    ref, _ = S._train_single(opts, batches)

    check(spawn("dist_scenarios", ["fsdp_checkpoint_save"]), "fsdp_checkpoint_save")
    resumed = _one_process(opts, batches, 3, S.STEPS, ckpt_in=str(tmp_path / "two"))
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert (a - b).abs().max().item() <= TOL, n

    _one_process(opts, batches, 0, 3, ckpt_out=str(tmp_path / "one"))
    for r in check(spawn("dist_scenarios", ["fsdp_checkpoint_load"]), "fsdp_checkpoint_load"):
        assert r["diff"] <= TOL
        assert r["steps_loaded"] == [3] * len(r["steps_loaded"])
        assert r["momentum_dtypes"] == (["torch.float32"] if momentum_dtype else ["torch.bfloat16"])


def test_one_process_resumes_a_sharded_run_with_a_one_matrix_tensor_and_back(tmp_path, monkeypatch):
    """(Probe Z91.) A sharded run projects a (1, N, d) tensor's rows and a matrix's columns
    (FSDP2's "auto"); DCP loads into tensors the loading optimizer shapes, so one process
    with proj_dim=1 (the docs' advice until then) or "auto" failed inside torch's planner,
    and no one proj_dim could load it. proj_dim="sharded" is FSDP2's rule on one process:
    a 2 -> 1 resume and a 1 -> 2 one both equal a run that never stopped."""
    from torch.distributed.checkpoint.api import CheckpointException

    monkeypatch.setenv("FLORA_TEST_CKPT", str(tmp_path))

    def one(proj_dim, start, stop, ckpt_in=None, ckpt_out=None, **ref):
        model = S._one_matrices()
        opt = Flora(model.parameters(), **{**S.OPTS, "proj_dim": proj_dim, **ref})
        if ckpt_in:
            S._dcp_load(model, opt, ckpt_in)
        for step in range(start, stop):
            S.one_matrix_grads(model, step)
            opt.step()
        if ckpt_out:
            S._dcp_save(model, opt, ckpt_out)
        return model, opt

    ref, ref_opt = one("sharded", 0, 4, **S.REF)
    assert [ref_opt.state[p]["proj_dim"] for p in ref.parameters()] == [0, 0, 1]
    by_hand = S._one_matrices()  # the rule spelled out: rows of the (1, N, d) ones, columns of w
    hand_opt = Flora([{"params": [by_hand.pos, by_hand.tall], "proj_dim": 0}, {"params": [by_hand.w], "proj_dim": 1}],
                     **S.OPTS, **S.REF)
    for step in range(4):
        S.one_matrix_grads(by_hand, step)
        hand_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), by_hand.parameters()))

    (saved,) = {str(r["proj_dims"]) for r in check(spawn("dist_scenarios", ["fsdp_one_matrix_checkpoint_save"]),
                                                   "fsdp_one_matrix_checkpoint_save")}
    assert saved == "[0, 0, 1]"
    for proj_dim in (1, "auto"):  # what failed: torch's planner, before Flora sees the state
        with pytest.raises(CheckpointException, match="Size mismatch"):
            one(proj_dim, 3, 4, ckpt_in=str(tmp_path / "two"))
    resumed, _ = one("sharded", 3, 4, ckpt_in=str(tmp_path / "two"))
    for (n, a), b in zip(ref.named_parameters(), resumed.parameters()):
        assert (a - b).abs().max().item() <= TOL, n

    one("sharded", 0, 3, ckpt_out=str(tmp_path / "one"))
    for r in check(spawn("dist_scenarios", ["fsdp_one_matrix_checkpoint_load"]), "fsdp_one_matrix_checkpoint_load"):
        for n, a in ref.named_parameters():
            assert (a.detach() - torch.tensor(r["params"][n])).abs().max().item() <= TOL, n


def test_relative_step_lr_zero_is_an_empty_step():
    """What DCP's state helpers do to a fresh optimizer: lr=0 in every group, gradients of
    zeros, one step. (Any other lr=0 under relative_step is refused: tests/test_reliability.py.)"""
    p = nn.Parameter(torch.randn(4, 5))
    opt = Flora([p], rank=2, beta1=0.9, weight_decay=0.1)  # relative_step=True, lr=None
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.zeros_like(p)
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before) and opt.state[p]["step"] == 1
    with pytest.raises(ValueError, match="lr must be None"):
        Flora([p], lr=1e-3, relative_step=True)


# ------------------------------------------------------------------ DeepSpeed


def test_fsdp1_marks_are_refused_and_vectors_alone_are_not():
    """The marks FSDP1 puts on what it hands optimizers, without a process group: a
    FlatParameter (``_is_flat_param``) anywhere; the model's own parameters
    (``_fsdp_flattened``) when every one of them is a 1-D share. One 2-D parameter among them
    (FSDP1 not sharding), or no FSDP1 mark at all, is stepped as usual."""
    flat = nn.Parameter(torch.randn(30))
    flat._is_flat_param = True
    with pytest.raises(ValueError, match=r"FlatParameter.*30 elements.*fully_shard"):
        Flora([flat], lr=1e-3)
    shares = [nn.Parameter(torch.randn(n)) for n in (20, 0, 7)]
    for p in shares:
        p._fsdp_flattened = True
    with pytest.raises(ValueError, match=r"all 3 parameters.*use_orig_params=True.*fully_shard"):
        Flora([{"params": shares[:1]}, {"params": shares[1:], "weight_decay": 0.0}], lr=1e-3, rank=4, beta1=0.9)
    whole = nn.Parameter(torch.randn(4, 5))
    whole._fsdp_flattened = True
    opt = Flora(shares + [whole], lr=1e-3, rank=2, beta1=0.9)  # FSDP1 NO_SHARD: shapes kept
    Flora([nn.Parameter(torch.randn(20)), nn.Parameter(torch.randn(3))], lr=1e-3)  # plain vectors
    for p in shares + [whole]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert "exp_avg_c" in opt.state[whole]
    # the same tensors sharded after Flora was built: every one with a gradient 1-D, refused at the step
    fresh = nn.Parameter(torch.randn(6, 5))
    fresh._fsdp_flattened = True
    opt = Flora([fresh], lr=1e-3, rank=2, beta1=0.9)
    fresh.data = fresh.data.flatten()[:17].clone()
    fresh.grad = torch.ones(17)
    before = fresh.detach().clone()
    with pytest.raises(ValueError, match="sharded parameters"):
        opt.step()
    assert torch.equal(fresh, before) and not opt.state[fresh]
    # one parameter at a time (fused accumulation's step_parameter) refuses the same, unchanged
    with pytest.raises(ValueError, match="sharded parameters"):
        opt.step_parameter(fresh)
    assert torch.equal(fresh, before) and not opt.state[fresh]
    late = nn.Parameter(torch.randn(6, 5))
    opt = Flora([late], lr=1e-3, rank=2, beta1=0.9)
    late._is_flat_param = True  # flattened after Flora was built
    late.grad = torch.ones_like(late)
    before = late.detach().clone()
    with pytest.raises(ValueError, match="FlatParameter"):
        opt.step_parameter(late)
    assert torch.equal(late, before) and not opt.state[late]


def test_the_accumulator_says_when_flat_pieces_leave_nothing_to_compress():
    """DeepSpeed's or FSDP1's 1-D pieces reach CompressedAccumulator as vectors: summed densely
    (exact), and with a rank a warning says nothing is compressed. Plain vectors, a model with
    one matrix left whole, or rank=None: no warning."""
    import warnings

    from flora import CompressedAccumulator

    flat = nn.Parameter(torch.randn(30))
    flat._is_flat_param = True
    with pytest.warns(UserWarning, match=r"rank=4\) compresses nothing.*1 of its 2.*FSDP1.*fully_shard"):
        acc = CompressedAccumulator([flat, nn.Parameter(torch.randn(3))], rank=4, tau=2)
    acc.remove()
    piece = nn.Parameter(torch.randn(12))
    piece.ds_shape = torch.Size([3, 4])
    with pytest.warns(UserWarning, match="DeepSpeed ZeRO"):
        CompressedAccumulator([piece], rank=2, tau=2).remove()
    whole = nn.Parameter(torch.randn(6, 5))
    whole._fsdp_flattened = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressedAccumulator([flat, whole], rank=2, tau=2).remove()  # FSDP1 NO_SHARD keeps a matrix whole
        CompressedAccumulator([nn.Parameter(torch.randn(20))], rank=2, tau=2).remove()  # plain vectors
        CompressedAccumulator([flat], rank=None, tau=2).remove()


def test_deepspeed_partitions_are_refused():
    """DeepSpeed ZeRO marks the flat partitions it hands optimizers (ds_shape, ds_id)."""
    p = nn.Parameter(torch.randn(12))
    p.ds_shape, p.ds_id = torch.Size([3, 4]), 0
    with pytest.raises(ValueError, match=r"DeepSpeed.*\(3, 4\).*FSDP2"):
        Flora([p], lr=1e-3)
    q = nn.Parameter(torch.randn(12))
    opt = Flora([q], lr=1e-3)
    q.ds_id = 7  # attached after the optimizer was built (ZeRO-1/2 swap the groups' tensors)
    q.grad = torch.randn_like(q)
    before = q.detach().clone()
    with pytest.raises(ValueError, match="DeepSpeed"):
        opt.step()
    assert torch.equal(q, before) and not opt.state[q]
