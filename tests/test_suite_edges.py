"""The selection suite's scoring and running at their edges (probe Z80, mutation testing of
flora.bench.suite: each case failed on a one-line mutant that every other test passed).
Hand-made records, and a stub workload whose losses are known exactly."""

from __future__ import annotations

import json
import types

import pytest
import torch

from flora.bench.suite import curves, runner, score, space

F, T, K = space.FLOOR, space.TARGET, space.KAPPA


def _row(task, opt, lr, seed, val, test, **kw):
    return {"task": task, "optimizer": opt, "lr": lr, "seed": seed, "kappa": K, "status": "ok",
            "val_loss": val, "test_loss": test, "state_bytes": 10, "train_s": 1.0, **kw}


def test_a_candidate_missing_a_task_ranks_behind_every_complete_one():
    """Its worst case is over the tasks it ran: 0.5 on task a alone would have ranked it
    first, ahead of candidates measured everywhere."""
    rows = [r for t in ("a", "b") for r in (_row(t, F, 1e-3, 0, 1.0, 1.0), _row(t, T, 1e-3, 0, 1.0, 0.9),
                                               _row(t, "flora-r8-x", 1e-3, 0, 1.0, 1.0))]
    rows.append(_row("a", "flora-r8-y", 1e-3, 0, 1.0, 0.5))
    ranks = score.ranking(score.choose(rows), K, ["a", "b"])
    assert ranks[-1]["optimizer"] == "flora-r8-y" and ranks[-1]["missing"] == ["b"]
    assert all(not r["missing"] for r in ranks[:-1])


def test_a_gap_is_resolved_by_its_size_whichever_side_wins():
    """Where the floor beats the target (cnn, tabular), the gap is negative: the seeds'
    spread is compared with its size (against the signed gap, never resolved)."""
    rows = []
    for s, d in enumerate((0.0, 0.01, -0.01)):
        rows += [_row("a", F, 1e-3, s, 1.0, 1.0 + d), _row("a", T, 1e-3, s, 1.0, 1.2)]
    g = score.gaps(score.choose(rows))["a"]
    assert g["gap"] == pytest.approx(-0.2) and g["gap_std"] < 0.05 and g["resolved"]


def test_a_row_equal_to_the_target_on_every_seed_matches_it():
    rows = []
    for s, x in enumerate((1.0, 1.1, 0.9)):
        rows += [_row("a", F, 1e-3, s, 1.0, x + 0.2), _row("a", T, 1e-3, s, 1.0, x),
                 _row("a", score.DEFAULT_ROWS[1], 1e-3, s, 1.0, x)]
    (g,) = score.goal_check(score.choose(rows), ["a"])
    assert g["vs_target"] == 0 and g["vs_target_std"] == 0 and g["matches_target"]


def test_a_crash_logged_after_a_finished_run_of_the_same_seed_does_not_replace_it():
    """choose() files the baselines of every kappa together: a floor that crashed in a
    later sweep at kappa 1000 had replaced its finished seed-0 run (one seed left, a note)."""
    rows = [_row("a", F, 1e-3, 0, 1.0, 1.0), _row("a", F, 1e-3, 1, 1.1, 1.1),
            {"task": "a", "optimizer": F, "lr": 1e-3, "seed": 0, "kappa": 1000, "status": "error: RuntimeError: x"}]
    (c,) = score.choose(rows)
    assert c["seeds"] == 2 and c["test_loss"] == pytest.approx(1.05) and not c["notes"]


def test_a_peer_with_equal_state_and_lower_loss_does_not_dominate():
    """Dominance needs strictly less state (and lower loss)."""
    rows = [_row("cnn", score.DEFAULT_ROWS[0], 1e-3, 0, 1.0, 1.0, state_bytes=100),
            _row("cnn", "adamw-8bit", 1e-3, 0, 0.9, 0.9, state_bytes=100)]
    assert score.dominance(score.choose(rows), ["cnn"]) == []
    rows[1]["state_bytes"] = 99
    assert [(d["flora"], d["peer"]) for d in score.dominance(score.choose(rows), ["cnn"])] == [
        (score.DEFAULT_ROWS[0], "adamw-8bit")]


def test_a_gap_measured_on_one_seed_gives_no_verdict():
    rows = [_row("a", F, 1e-3, 0, 1.0, 1.2), _row("a", T, 1e-3, 0, 1.0, 1.0)]
    chosen = score.choose(rows)
    md = score.markdown(chosen, score.gaps(chosen), score.ranking(chosen, K, ["a"]), {}, ["a"])
    (line,) = [x for x in md.splitlines() if x.startswith("| a |")]
    assert line.rstrip().endswith("| 1 seed |")


def test_an_lr_tied_with_the_chosen_one_is_not_said_to_beat_it():
    rows = [_row("a", F, 1e-3, s, 1.0, 1.0) for s in range(3)] + [_row("a", F, 2e-3, 0, 1.0, 1.0)]
    (c,) = score.choose(rows)
    assert c["lr"] == 1e-3 and not any("beat" in n for n in c["notes"])


def test_a_grid_of_one_lr_is_not_extended():
    """--lrs 1e-3 --extend-lr 2: no edge to step beyond (read as two lrs, it failed with an
    IndexError)."""
    jobs = [space.Job("cnn", "x", 1e-3, s) for s in (0, 1)]
    rows = [_row("cnn", "x", 1e-3, s, 1.0, 1.0) for s in (0, 1)]
    assert space.extensions(jobs, rows, cap=2) == []


def test_of_two_extension_lrs_begun_on_some_seeds_the_nearer_is_finished_first():
    grid = (1e-3, 2e-3, 4e-3)
    jobs = [space.Job("cnn", "up", lr, s) for lr in grid for s in (0, 1)]
    vals = {(lr, s): 1.0 - lr * 10 for lr in grid for s in (0, 1)}
    vals[(8e-3, 0)], vals[(1.6e-2, 0)] = 0.5, 0.4
    rows = [_row("cnn", "up", lr, s, v, v) for (lr, s), v in vals.items()]
    assert [(j.lr, j.seed) for j in space.extensions(jobs, rows, cap=3)] == [(8e-3, 1)]


def test_the_baselines_are_planned_once_at_the_primary_kappa():
    """--kappas 100,1000: the baselines run at the first (their keys are what --resume finds)."""
    jobs = space.plan(["cnn"], [F, "flora-r8-x"], seeds=1, kappas=(100, 1000))
    assert {j.kappa for j in jobs if j.optimizer == F} == {100}
    assert {j.kappa for j in jobs if j.optimizer == "flora-r8-x"} == {100, 1000}


def test_early_stopping_takes_the_step_of_least_validation_loss():
    curve = [{"step": 10, "val_loss": 2.0, "test_loss": 2.1}, {"step": 20, "val_loss": 1.9, "test_loss": 1.8},
             {"step": 30, "val_loss": 1.95, "test_loss": 1.85}]
    (one,) = curves.early_stopped([{"task": "a", "optimizer": F, "lr": 1e-3, "seed": 0, "curve": curve}])
    assert (one["stopped_test"], one["stopped_step"]) == (1.8, 20)


class _Stub:
    """A workload whose training loss at (step, micro) is step + micro / tau exactly (the
    model's part is multiplied by zero); inputs turn infinite from ``inf_from`` on."""
    device = "cpu"

    def __init__(self, steps, tau, inf_from=None):
        self.spec = types.SimpleNamespace(steps=steps, tau=tau)
        self.inf_from = inf_from

    def build(self, seed):
        torch.manual_seed(seed)
        return torch.nn.Linear(4, 1)

    def batch(self, step, micro):
        scale = float("inf") if self.inf_from is not None and self.inf_from <= step < 10_000 else 1.0
        return torch.ones(2, 4) * scale, torch.tensor(step + micro / self.spec.tau)

    def loss(self, model, x, y):
        return (model(x) * 0).sum() + y if torch.isfinite(x).all() else model(x).sum()

    def evaluate(self, model, split):
        return {"loss": float(model(torch.ones(2, 4)).detach().square().mean())}


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(runner, "_CTX", {"folder": ".", "device": "cpu", "scale": 1.0})

    def put(w):
        monkeypatch.setitem(runner._WORKLOADS, "stub", w)
        return space.Job("stub", "adafactor", 1e-2, 0)
    return put


@pytest.mark.parametrize("tau", [1, 2])
def test_the_training_loss_is_the_mean_over_the_last_tenth_of_steps_and_all_micro_batches(stub, tau):
    """Steps 180-199 of 200; each step's loss the mean of its micro-batches' (the last
    micro-batch's alone had been taken: 190.5 for 190.25 at tau 2)."""
    out = runner.run_job(stub(_Stub(200, tau)))
    want = sum(s + m / tau for s in range(180, 200) for m in range(tau)) / tau / 20
    assert out["status"] == "ok" and out["train_loss"] == pytest.approx(want, rel=1e-6)


def test_a_run_that_diverged_before_its_last_tenth_has_no_training_loss(stub):
    """It stops at step 49 with nothing summed: 0.0 had been logged, a perfect-looking figure."""
    out = runner.run_job(stub(_Stub(200, 1, inf_from=30)))
    assert out["status"] == "diverged" and out["train_loss"] is None


def test_curves_take_the_suites_primary_kappa_and_say_when_nothing_matches(tmp_path):
    """A suite swept with --kappas 1000 files every chosen lr at 1000: curves looked under
    the library's kappa, found none, ran nothing and drew empty figures without a word."""
    chosen = [{"task": "cnn", "optimizer": o, "kappa": 1000, "lr": 1e-3} for o in curves.OPTIMIZERS]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"kappas": [1000, 100]}, "chosen": chosen}))
    assert curves.suite_kappa(tmp_path) == 1000
    assert curves.chosen_lrs(tmp_path, curves.suite_kappa(tmp_path))[("cnn", F)] == 1e-3
    (tmp_path / "results.json").write_text(json.dumps({"chosen": chosen}))  # no meta: the chosen rows' kappa
    assert curves.suite_kappa(tmp_path) == 1000
    with pytest.raises(SystemExit, match="chose no lr at kappa 100"):
        curves.run(tmp_path, ["cnn"], list(curves.OPTIMIZERS), 1, 10, tmp_path / "out", tmp_path, kappa=100)
