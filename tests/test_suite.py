"""The selection suite (flora-bench suite): its plan, its scoring, and real tiny runs."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch

from flora.bench.suite import data, runner, score, space, workloads
from flora.bench.suite.peers import PEERS


def test_staged_plan_screens_everything_on_seed_0_first():
    tasks = ["cnn", "tabular"]
    jobs = space.staged_plan(tasks, seeds=3)
    keys = [j.key for j in jobs]
    assert len(keys) == len(set(keys))
    main = space.candidates()
    n0 = len(tasks) * len(main) * 5
    assert {j.seed for j in jobs[:n0]} == {0} and {j.optimizer for j in jobs[:n0]} == set(main)
    peers0 = jobs[n0:n0 + len(tasks) * len(PEERS) * 5]
    assert {j.optimizer for j in peers0} == set(PEERS) and {j.seed for j in peers0} == {0}
    assert {j.seed for j in jobs} == {0, 1, 2}
    assert {j.kappa for j in jobs if not j.optimizer.startswith("flora")} == {space.KAPPA}
    assert any(j.kappa == space.KAPPA for j in jobs) and any(j.kappa == 1000 != space.KAPPA for j in jobs)
    # every Flora candidate of the plan is a valid bench name
    from flora.bench import optimizers

    for name in {j.optimizer for j in jobs} - set(PEERS):
        optimizers.parse(name)


def test_suite_takes_the_fixed_form_with_and_without_a_weight():
    """--forms fixed-orthonormal,fixed0.25-orthonormal: candidates at every rank, checked by
    the CLI, built as flora.Flora with complement_weight None (the default 0.4) and 0.25."""
    import argparse

    from flora.bench.suite import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    a = p.parse_args(["--forms", "fixed-orthonormal,fixed0.25-orthonormal", "--ranks", "8", "--baselines", "adafactor",
                      "--tasks", "tabular"])
    cli.check(p, a)
    assert list(a.optimizer_list) == ["adafactor", "flora-r8-fixed-orthonormal", "flora-r8-fixed0.25-orthonormal"]
    model = torch.nn.Linear(12, 10)
    for name, weight in zip(a.optimizer_list[1:], (None, 0.25)):
        group = runner._optimizer(name, model, 1e-3, kappa=space.KAPPA, seed=0).param_groups[0]
        assert (group["momentum_form"], group["projection"], group["complement_weight"]) == (
            "fixed", "orthonormal", weight)
    bad = p.parse_args(["--forms", "scaled0.25-orthonormal", "--tasks", "tabular"])
    with pytest.raises(SystemExit):
        cli.check(p, bad)


def _rows(values: dict) -> list[dict]:
    """Rows of (task, optimizer, lr, seed) -> (val, test)."""
    out = []
    for (task, opt, lr, seed), (val, test) in values.items():
        out.append({"task": task, "optimizer": opt, "lr": lr, "seed": seed, "kappa": space.KAPPA, "status": "ok",
                    "val_loss": val, "test_loss": test, "state_bytes": 10, "train_s": 1.0})
    return out


def test_scoring_picks_the_lr_by_mean_validation_loss_and_ranks_by_the_worst_task():
    f, t, c = space.FLOOR, space.TARGET, "flora-r8-adaptive-orthonormal"
    v = {}
    for seed in range(3):
        for task, (floor, target, cand) in {"a": (2.0, 1.8, 1.7), "b": (1.0, 0.9, 1.05)}.items():
            for lr, bump in ((1e-3, 0.1), (2e-3, 0.0), (4e-3, 0.2)):
                v[(task, f, lr, seed)] = (floor + bump, floor + bump + 0.01 * seed)
                v[(task, t, lr, seed)] = (target + bump, target + bump + 0.01 * seed)
                v[(task, c, lr, seed)] = (cand + bump, cand + bump)
    chosen = score.choose(_rows(v))
    by = {(x["task"], x["optimizer"]): x for x in chosen}
    assert by[("a", f)]["lr"] == 2e-3 and by[("a", f)]["edge"] == "" and by[("a", f)]["seeds"] == 3
    assert by[("a", f)]["test_loss"] == pytest.approx(2.01)
    gaps = score.gaps(chosen)
    assert gaps["a"]["gap"] == pytest.approx(0.2) and gaps["a"]["resolved"]
    rank = {r["optimizer"]: r for r in score.ranking(chosen, space.KAPPA, ["a", "b"])}
    assert rank[c]["worst_task"] == "b"
    assert rank[c]["worst"] == pytest.approx(1.05 / 1.01)
    # its spread: the ratio seed by seed (the floor's test loss moves with the seed, the candidate's not)
    assert rank[c]["worst_std"] == pytest.approx(statistics.stdev([1.05 / 1.0, 1.05 / 1.01, 1.05 / 1.02]))
    assert rank[f]["worst_std"] == pytest.approx(0.0, abs=1e-12)
    md = score.markdown(chosen, gaps, list(rank.values()), {}, ["a", "b"])
    assert f"| {c} | {space.KAPPA} | {1.05 / 1.01:.4f} ± {rank[c]['worst_std']:.4f} | b |" in md
    assert score.position(1.7, 2.0, 1.8) == pytest.approx(1.5)


def test_goal_check_compares_on_paired_seeds():
    f, t, c = space.FLOOR, space.TARGET, score.DEFAULT_ROWS[0]
    v = {}
    for seed, noise in enumerate((0.0, 0.3, -0.3)):  # a seed effect shared by all: paired, it cancels
        v[("a", f, 1e-3, seed)] = (1.0, 1.0 + noise)
        v[("a", t, 1e-3, seed)] = (1.0, 0.9 + noise + 0.01 * seed)
        v[("a", c, 1e-3, seed)] = (1.0, 0.95 + noise)
    (g,) = score.goal_check(score.choose(_rows(v)), ["a"])
    assert g["vs_floor"] == pytest.approx(-0.05) and g["vs_floor_std"] == pytest.approx(0.0, abs=1e-12)
    assert g["beats_floor"] and not g["matches_target"] and g["seeds"] == 3


def test_one_seed_has_no_spread_in_the_report():
    """A row of one seed has an unknown spread: no "± 0.0000" that reads as a measured one."""
    f, t, c = space.FLOOR, space.TARGET, score.DEFAULT_ROWS[0]
    v = {("a", f, 1e-3, 0): (1.0, 1.0), ("a", t, 1e-3, 0): (0.9, 0.9), ("a", c, 1e-3, 0): (0.95, 0.95)}
    chosen = score.choose(_rows(v))
    assert all(x["seeds"] == 1 and x["test_loss_std"] is None for x in chosen)
    text = score.markdown(chosen, score.gaps(chosen), score.ranking(chosen, space.KAPPA, ["a"]), {}, ["a"])
    assert "0.9500" in text and "± 0.0000" not in text


def test_early_stopping_table_of_one_seed_has_no_spread():
    from flora.bench.suite.curves import early_stopped
    curve = [{"step": 10, "val_loss": 2.0, "test_loss": 2.1}, {"step": 20, "val_loss": 1.9, "test_loss": 1.8}]
    row = {"task": "a", "optimizer": "adafactor", "lr": 1e-3, "seed": 0, "curve": curve}
    (one,) = early_stopped([row])
    assert one["final_test"] == 1.8 and one["final_test_std"] is None and one["stopped_test_std"] is None
    (two,) = early_stopped([row, dict(row, seed=1)])
    assert two["final_test_std"] == 0.0 and two["seeds"] == 2


def test_an_edge_lr_is_flagged():
    v = {("a", space.FLOOR, lr, 0): (1.0 - lr, 1.0) for lr in (1e-3, 2e-3)}
    (c,) = score.choose(_rows(v))
    assert c["lr"] == 2e-3 and c["edge"] == "high"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return data.prepare(tmp_path_factory.mktemp("suite-data"), only=("digits.pt", "tabular.pt", data.BBC_BYTES))


@pytest.mark.parametrize("task", ["newslm", "cnn", "vit", "tabular", "stream", "cnnstream", "tabstream"])
def test_a_tiny_run_learns_and_counts_its_state(folder, task):
    runner._init(str(folder), "cpu", 0.04, 1)
    w = runner._workload(task)
    before = w.evaluate(w.build(0), "val")["loss"]
    r = runner.run_job(space.Job(task, "flora-r8-adaptive-orthonormal", 4e-3, 0))
    assert r["status"] == "ok" and r["val_loss"] < before - 0.05, (r["val_loss"], before)
    assert 0 < r["state_bytes"] < runner.adamw_state_bytes(task)
    again = runner.run_job(space.Job(task, "flora-r8-adaptive-orthonormal", 4e-3, 0))
    assert again["val_loss"] == r["val_loss"]  # batches and init are pure functions of the seeds


def test_batches_are_the_same_for_every_optimizer_and_differ_by_step(folder):
    w = workloads.make("cnn", folder, "cpu", 0.04)
    x0, y0 = w.batch(3, 0)
    x1, y1 = w.batch(3, 0)
    x2, _ = w.batch(4, 0)
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and not torch.equal(x0, x2)


@pytest.mark.parametrize("task", ["cnnstream", "tabstream"])
def test_fresh_data_twins_draw_new_examples_every_step_and_hold_out_fixed_ones(folder, task):
    w = workloads.make(task, folder, "cpu", 0.04)
    (x0, y0), (x1, y1), (x2, _) = w.batch(3, 0), w.batch(3, 0), w.batch(4, 0)
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and not torch.equal(x0, x2)
    again = workloads.make(task, folder, "cpu", 0.04)
    assert torch.equal(w.held["test"][0], again.held["test"][0]) and not torch.equal(w.held["val"][0], w.held["test"][0])
    y = w.held["test"][1]
    counts = torch.bincount(y, minlength=int(y.max()) + 1)
    assert counts.min() > 0.5 * counts.float().mean()  # every class present in good measure


def test_a_run_can_record_its_held_out_curve(folder):
    runner._init(str(folder), "cpu", 0.04, 1)
    r = runner.run_job(space.Job("tabular", space.FLOOR, 4e-3, 0), curve_every=5)
    steps = [p["step"] for p in r["curve"]]
    assert steps[0] == 0 and steps[-1] == r["steps"] and len(steps) == len(set(steps))
    assert {"train_loss", "val_loss", "test_loss"} <= set(r["curve"][0])
    assert r["curve"][-1]["test_loss"] == pytest.approx(r["test_loss"])
    s = runner.run_job(space.Job("stream", space.FLOOR, 4e-3, 0), curve_every=5)
    assert "train_loss" not in s["curve"][0]  # no fixed training split on a stream


def test_report_without_plots_removes_a_plot_of_earlier_runs(tmp_path):
    """(Probe Z44.) --no-plots left loss_vs_state.png drawn from an earlier state of the log
    beside tables that had moved on."""
    from flora.bench.suite import cli

    with open(tmp_path / "runs.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in _rows({("cnn", space.FLOOR, 1e-3, 0): (1.0, 1.0)}))
    (tmp_path / "loss_vs_state.png").write_bytes(b"an old plot")
    cli.report(tmp_path, ["cnn"], space.KAPPA, {}, plots=False)
    assert not (tmp_path / "loss_vs_state.png").exists()
    # --report-only ran nothing: its plot may be of this very log, and stays (a review)
    (tmp_path / "loss_vs_state.png").write_bytes(b"a plot")
    cli.report(tmp_path, ["cnn"], space.KAPPA, {}, plots=False, ran=False)
    assert (tmp_path / "loss_vs_state.png").exists()


def test_setting_a_log_aside_overwrites_no_earlier_report(tmp_path):
    """(Review.) With runs.previous.jsonl deleted by hand, results.previous.md was
    overwritten: the number is free for the log and its reports alike."""
    from flora.bench.suite import cli

    (tmp_path / "runs.jsonl").write_text("")
    (tmp_path / "results.md").write_text("new")
    (tmp_path / "results.previous.md").write_text("kept")
    assert cli.set_aside(tmp_path / "runs.jsonl") == tmp_path / "runs.previous.2.jsonl"
    assert (tmp_path / "results.previous.md").read_text() == "kept"
    assert (tmp_path / "results.previous.2.md").read_text() == "new"


def test_report_writes_markdown_csv_json_and_a_plot(tmp_path):
    from flora.bench.suite import cli

    v = {}
    for seed in range(2):
        for opt, base in ((space.FLOOR, 1.0), (space.TARGET, 0.9), ("flora-r8-scaled-orthonormal", 0.92)):
            for lr in (1e-3, 2e-3, 4e-3):
                v[("cnn", opt, lr, seed)] = (base + abs(math.log2(lr / 2e-3)) * 0.1, base + 0.001 * seed)
    with open(tmp_path / "runs.jsonl", "w") as fh:
        for r in _rows(v):
            fh.write(json.dumps(r) + "\n")
        fh.write('{"truncated": ')  # a line cut by a kill is skipped
    (tmp_path / "adamw_state.json").write_text(json.dumps({"cnn": 100}))
    res = cli.report(tmp_path, ["cnn"], space.KAPPA, {}, plots=True)
    md = (tmp_path / "results.md").read_text()
    assert f"| flora-r8-scaled-orthonormal | {space.KAPPA} |" in md and "10.0%" in md
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == 18
    assert (tmp_path / "loss_vs_state.png").stat().st_size > 1000
    assert [r["optimizer"] for r in res["ranking"]] == [space.TARGET, "flora-r8-scaled-orthonormal", space.FLOOR]


def test_win_matrix_labels_every_kappa_but_the_primary_one():
    v = {("cnn", opt, 1e-3, 0): (1.0, 1.0) for opt in (space.FLOOR, space.TARGET, "flora-r8-scaled-orthonormal")}
    other = 1000 if space.KAPPA != 1000 else 100
    rows = _rows(v) + [{**r, "kappa": other} for r in _rows({("cnn", "flora-r8-scaled-orthonormal", 1e-3, 0): (1.0, 1.0)})]
    # a baseline logged under another kappa (a sweep's first) still counts at the primary one
    rows += [{**r, "kappa": other} for r in _rows({("cnn", space.FLOOR, 2e-3, 0): (2.0, 2.0)})]
    chosen = score.choose(rows)
    assert [(c["optimizer"], c["kappa"]) for c in chosen if c["optimizer"] == space.FLOOR] == [(space.FLOOR, space.KAPPA)]
    md = score.markdown(chosen, score.gaps(chosen), score.ranking(chosen, other, ["cnn"]), {}, ["cnn"])
    assert f"| flora-r8-scaled-orthonormal kappa {other} |" in md and "| flora-r8-scaled-orthonormal | 1.0000" in md


def test_bitsandbytes_8bit_adamw_runs_on_this_device_and_counts_its_codes():
    import importlib.metadata

    try:  # by its distribution: where it is absent, flora.bench may have put a stub in sys.modules
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bitsandbytes is not installed (the peers extra)")
    from flora.bench.suite import peers
    import flora

    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 4))
    opt = peers.build("adamw-8bit-bnb", model, 1e-3)
    model(torch.randn(8, 128)).square().sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    big, small = model[0].weight.numel(), sum(p.numel() for p in model.parameters()) - model[0].weight.numel()
    n = flora.state_bytes(opt)
    # two 1-byte codes per weight of the 8192-element tensor (with block scales and code
    # maps); tensors under 4096 elements keep float32 moments
    assert 2 * big + 8 * small <= n < 2 * big + 8 * small + 4096


def test_dominance_lists_a_peer_with_less_state_and_lower_loss_than_the_default():
    rows = []
    for seed in range(2):
        for opt, loss, state in ((score.DEFAULT_ROWS[0], 1.0, 100), (score.DEFAULT_ROWS[1], 1.1, 300),
                                 ("adamw-8bit", 0.95, 200), ("apollo-mini", 1.2, 50)):
            rows += [{**r, "state_bytes": state} for r in _rows({("cnn", opt, 1e-3, seed): (loss, loss + 0.01 * seed)})]
    chosen = score.choose(rows)
    dom = score.dominance(chosen, ["cnn"])
    assert [(d["flora"], d["peer"]) for d in dom] == [(score.DEFAULT_ROWS[1], "adamw-8bit")]
    assert dom[0]["diff"] == pytest.approx(-0.15) and dom[0]["seeds"] == 2
    md = score.markdown(chosen, score.gaps(chosen), [], {}, ["cnn"])
    assert f"| cnn | {score.DEFAULT_ROWS[1]} | adamw-8bit | 200 / 300 |" in md


def test_a_report_says_what_it_could_not_compare():
    """(Probe Z44.) With no floor or target run (``--baselines ""``) the floor/target table
    and the ranking came out as headers alone, and with no default row at r8 or r32 the
    peers' check said "None.", which reads as a verdict. Both say what did not run."""
    rows = _rows({("cnn", "flora-r4-floored-orthonormal", 1e-3, 0): (1.0, 1.0),
                  ("cnn", "adamw-8bit", 1e-3, 0): (0.9, 0.9)})
    chosen = score.choose(rows)
    md = score.markdown(chosen, score.gaps(chosen), score.ranking(chosen, space.KAPPA, ["cnn"]), {}, ["cnn"])
    assert "- cnn: neither the floor nor the target has a result: no gap, ranking or goal check" in md
    # one of them: said as such (a review: the note had said neither, and that the ranking left it out)
    rows += _rows({("cnn", space.FLOOR, 1e-3, 0): (1.1, 1.1)})
    chosen = score.choose(rows)
    ranks = score.ranking(chosen, space.KAPPA, ["cnn"])
    md = score.markdown(chosen, score.gaps(chosen), ranks, {}, ["cnn"])
    assert "- cnn: the target (`adafactor-b0.9`) has no result: no gap, goal check or win-matrix position (the " \
           "ranking, against the floor, keeps it)" in md
    assert any(r["optimizer"] == "flora-r4-floored-orthonormal" and "cnn" in r["ratios"] for r in ranks)
    assert "Not checked: Flora's default form ran at neither r8 nor r32 here" in md and "\nNone." not in md


def _ext_rows(vals, kappa=space.KAPPA):
    """Run-log rows: {(task, optimizer, lr, seed): val_loss (None: diverged)}."""
    return [{"task": t, "optimizer": o, "lr": lr, "seed": s, "kappa": kappa, "val_loss": v,
             "status": "ok" if v is not None else "diverged"} for (t, o, lr, s), v in vals.items()]


def test_lr_extension_steps_beyond_an_edge_best_on_every_seed_up_to_the_cap():
    grid = (1e-3, 2e-3, 4e-3)
    jobs = [space.Job("cnn", o, lr, s) for o in ("up", "down", "inside", "tie", "nan-top") for lr in grid for s in (0, 1)]
    vals = {}
    for s in (0, 1):
        for lr in grid:
            vals["cnn", "up", lr, s] = 1.0 - lr * 10 + 0.01 * s  # best at the top
            vals["cnn", "down", lr, s] = 1.0 + lr * 10  # best at the bottom
            vals["cnn", "inside", lr, s] = abs(lr - 2e-3)
            vals["cnn", "tie", lr, s] = 1.0 if lr < 4e-3 else 2.0  # 1e-3 and 2e-3 equal: flat
            vals["cnn", "nan-top", lr, s] = None if lr == 4e-3 else 1.0 - lr * 10  # diverged top: interior
    ext = space.extensions(jobs, _ext_rows(vals), cap=2)
    got = sorted((j.optimizer, j.lr, j.seed) for j in ext)
    assert got == [("down", 5e-4, 0), ("down", 5e-4, 1), ("up", 8e-3, 0), ("up", 8e-3, 1)], got
    vals["cnn", "up", 8e-3, 0], vals["cnn", "up", 8e-3, 1] = 0.5, 0.6
    vals["cnn", "up", 1.6e-2, 0] = vals["cnn", "up", 1.6e-2, 1] = 0.4
    got = sorted((j.optimizer, j.lr) for j in space.extensions(jobs, _ext_rows(vals), cap=2))
    assert ("up", 3.2e-2) not in got  # two beyond the grid already: capped
    assert ("up", 3.2e-2) in {(j.optimizer, j.lr) for j in space.extensions(jobs, _ext_rows(vals), cap=3)}
    assert space.extensions(jobs, _ext_rows(vals), cap=0) == []


@pytest.mark.slow
@pytest.mark.extended  # (16 s on 2 cores; test_bench.py's forms preset extends a grid by default)
def test_suite_cli_extends_the_lr_grid_until_capped(folder, tmp_path, monkeypatch, capsys):
    """--extend-lr end to end: lrs so small that the top is always best run 2 more, then stop;
    every round in the one pool of workers (each spawn imports torch anew). In a log (stderr
    no terminal) a line per finished run and no bar (tqdm's had been written there)."""
    from flora.bench.__main__ import main

    pools = []

    class Counted(runner.ProcessPoolExecutor):
        def __init__(self, *a, **k):
            pools.append(self)
            super().__init__(*a, **k)

    monkeypatch.setattr(runner, "ProcessPoolExecutor", Counted)
    monkeypatch.setattr(data, "prepare", lambda f, **k: f)  # the digits and table are there; skip the LM data
    out = tmp_path / "s"
    assert main(["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1",
                 "--lrs", "1e-6,2e-6", "--extend-lr", "2", "--scale", "0.04", "--workers", "1",
                 "--data", str(folder), "--out", str(out), "--no-plots", "--device", "cpu"]) == 0
    lrs = sorted(r["lr"] for r in runner.read_log(out / "runs.jsonl"))
    assert lrs == pytest.approx([1e-6, 2e-6, 4e-6, 8e-6])
    assert len(pools) == 1
    err = capsys.readouterr().err
    assert "\r" not in err and "suite: tabular adafactor kappa=" in err and " lr=8e-06 seed=0: " in err


@pytest.mark.parametrize("argv, words", [
    (["--baselines", "adafactor,adam-mni"], ["--baselines: unknown optimizer 'adam-mni'", *PEERS, "adafactor-b0.9"]),
    (["--forms", "floored"], ["--forms: flora-r", "floored", "orthonormal"]),
    (["--lrs", "1e-3,-1"], ["--lrs takes comma-separated finite numbers above 0, got '1e-3,-1'"]),
    (["--lrs", "nan"], ["--lrs takes comma-separated finite numbers above 0"]),
    (["--tasks", ","], ["--tasks names no task; valid: bytelm"]),
    # each job would run twice (probe Z44), as a repeated --tasks entry is refused
    (["--ranks", "4,4"], ["--ranks: 4 given more than once"]),
    (["--lrs", "1e-3,1e-3"], ["--lrs: 0.001 given more than once"]),
    (["--kappas", "100,5,100"], ["--kappas: 100 given more than once"]),
    # --staged fixes these (they were ignored, and the report took its primary kappa from --kappas)
    (["--staged", "--kappas", "5", "--lrs", "1e-3"], ["--lrs, --kappas: not used with --staged"]),
    (["--staged", "--baselines", "adafactor"], ["--baselines: not used with --staged"]),
])
def test_suite_bad_names_name_the_option_and_what_it_takes(argv, words, capsys):
    """A bad --baselines name is refused naming the option, with flora-bench's names and the
    suite's own peers; a bad --forms entry names --forms."""
    from flora.bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["suite", "--tasks", "tabular"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)


def test_report_uses_the_primary_kappa_of_kappas(tmp_path):
    """--kappas 50: the baselines are filed, and the goal check and dominance are made, at
    kappa 50 (they used the library default, so the goal check came out empty)."""
    from flora.bench.suite import cli

    k = 50 if space.KAPPA != 50 else 70
    rows = []
    for seed in range(2):
        for opt, loss, state in ((space.FLOOR, 1.0, 80), (space.TARGET, 0.9, 200), (score.DEFAULT_ROWS[0], 0.92, 100),
                                 ("adamw-8bit", 0.8, 50)):
            rows += [{**r, "kappa": k, "state_bytes": state}
                     for r in _rows({("cnn", opt, 1e-3, seed): (loss, loss + 0.01 * seed)})]
    chosen = score.choose(rows, k)
    assert {c["kappa"] for c in chosen} == {k}
    md = score.markdown(chosen, score.gaps(chosen), score.ranking(chosen, k, ["cnn"]), {}, ["cnn"], kappa=k)
    assert f"Goal check (kappa {k};" in md and f"| {score.DEFAULT_ROWS[0]} | -0.0800" in md
    assert f"| cnn | {score.DEFAULT_ROWS[0]} | adamw-8bit | 50 / 100 |" in md
    assert f"| {score.DEFAULT_ROWS[0]} | 0.9250" in md  # the primary kappa's rows are not labelled
    with open(tmp_path / "runs.jsonl", "w") as fh:  # the CLI passes --kappas' first through
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    assert cli.report(tmp_path, ["cnn"], k, {}, plots=False)["markdown"] == md


def test_candidates_whose_runs_all_failed_are_listed_not_dropped(tmp_path):
    from flora.bench.suite import cli

    rows = _rows({("cnn", space.FLOOR, 1e-3, 0): (1.0, 1.0)})
    rows += [{"task": "cnn", "optimizer": "flora-r8-scaled-orthonormal", "lr": lr, "seed": 0, "kappa": space.KAPPA,
              "status": f"error: ValueError: boom {lr}"} for lr in (1e-3, 2e-3)]
    rows += [{"task": "cnn", "optimizer": "adam-mini", "lr": 1e-3, "seed": 0, "kappa": space.KAPPA,
              "status": "error: Unavailable: adam_mini not importable"}]
    with open(tmp_path / "runs.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    res = cli.report(tmp_path, ["cnn"], space.KAPPA, {}, plots=False)
    md = (tmp_path / "results.md").read_text()
    assert "## Failed" in md
    assert (f"| cnn | flora-r8-scaled-orthonormal | {space.KAPPA} | 2 | error: ValueError: boom 0.001; "
            "error: ValueError: boom 0.002 |") in md
    assert "| cnn | adam-mini |" in md
    failed = json.loads((tmp_path / "results.json").read_text())["failed"]
    assert [(f["optimizer"], f["runs"]) for f in failed] == [("adam-mini", 1), ("flora-r8-scaled-orthonormal", 2)]
    assert res["failed"] == failed


def test_suite_exits_non_zero_when_every_run_failed(tmp_path, monkeypatch, capsys):
    from flora.bench.__main__ import main

    def fail_all(jobs, tasks, *, log, **k):
        with open(log, "a") as fh:
            fh.writelines(json.dumps({**j.to_dict(), "key": j.key, "status": "error: RuntimeError: x"}) + "\n"
                          for j in jobs)

    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", fail_all)
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--no-plots", "--device", "cpu"]
    assert main(argv) == 1
    assert "| tabular | adafactor |" in (tmp_path / "s" / "results.md").read_text()
    capsys.readouterr()
    assert main(argv + ["--report-only"]) == 0  # a report of what ran is not a failed run
    # the run options given beside it are said to be unused (probe Z135: ignored silently)
    assert ("--report-only: --forms, --baselines, --seeds, --lrs not used: the report covers the runs in "
            "OUT/runs.jsonl as they are") in capsys.readouterr().out


def test_cpu_workers_start_with_the_heap_allocator_env_and_the_parent_gets_its_own_back(tmp_path, monkeypatch):
    """run_all spawns its CPU workers (on submit) with CPU_WORKER_ENV set, unless the user
    set a value; on CUDA with nothing added; the parent's environment is restored after."""
    from concurrent.futures import Future

    seen = []

    class Pool:  # records the environment a spawned worker would copy, at each submit
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, job):
            seen.append({k: os.environ.get(k) for k in runner.CPU_WORKER_ENV})
            f = Future()
            f.set_result(0 if isinstance(job, str) else {**job.to_dict(), "key": job.key, "status": "ok"})
            return f

    monkeypatch.setattr(runner, "ProcessPoolExecutor", Pool)
    for k in runner.CPU_WORKER_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    job = space.Job("tabular", "adafactor", 1e-3, 0, 100)
    runner.run_all([job], ["tabular"], log=tmp_path / "runs.jsonl", folder=tmp_path, device="cpu", workers=1,
                   scale=0.04)
    assert seen == [{"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "123"}] * 2
    assert "MALLOC_MMAP_MAX_" not in os.environ and os.environ["MALLOC_TRIM_THRESHOLD_"] == "123"
    seen.clear()
    runner.run_all([job], ["tabular"], log=tmp_path / "cuda.jsonl", folder=tmp_path, device="cuda", workers=1,
                   scale=0.04)
    assert seen == [{"MALLOC_MMAP_MAX_": None, "MALLOC_TRIM_THRESHOLD_": "123"}] * 2


class _Pool:
    """Stands for the process pool: each submitted job's future holds what ``result(job)`` gives."""

    def __init__(self, result):
        self.result, self.submitted = result, []

    def submit(self, fn, job):
        from concurrent.futures import Future

        self.submitted.append(job)
        f = Future()
        try:
            f.set_result(self.result(job))
        except BaseException as e:  # noqa: BLE001
            f.set_exception(e)
        return f


def _ok(job):
    return {**job.to_dict(), "key": job.key, "status": "ok", "scale": 0.04}


def test_a_run_that_crashed_runs_again_and_one_that_finished_does_not(tmp_path):
    """(Found as a new user would.) --resume kept every logged key, crash rows included, so
    a sweep whose worker died could never run those jobs again but by editing the log."""
    jobs = [space.Job("tabular", "adafactor", lr, 0, 100) for lr in (1e-3, 2e-3, 4e-3)]
    log = tmp_path / "runs.jsonl"
    rows = [_ok(jobs[0]), {**jobs[1].to_dict(), "key": jobs[1].key, "status": "error: RuntimeError: x"},
            {**_ok(jobs[2]), "status": "diverged"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = _Pool(_ok)
    runner._run_round(pool, jobs, log, None)
    assert pool.submitted == [jobs[1]]


def test_a_dead_worker_logs_nothing_for_its_jobs_and_the_sweep_says_so(tmp_path, monkeypatch, capsys):
    """A worker killed (as by the out-of-memory killer) broke the pool: every pending job
    was logged as an error at once and the sweep exited 0. Now those jobs are not logged
    (--resume runs them), and the command says what happened and exits 1."""
    from concurrent.futures.process import BrokenProcessPool

    from flora.bench.__main__ import main

    jobs = [space.Job("tabular", "adafactor", lr, 0, 100) for lr in (1e-3, 2e-3)]

    def dies(job):
        if job is jobs[1]:
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")
        return _ok(job)

    log = tmp_path / "runs.jsonl"
    with pytest.raises(runner.WorkerLost) as e:
        runner._run_round(_Pool(dies), jobs, log, None)
    assert e.value.jobs == [jobs[1]] and [r["key"] for r in runner.read_log(log)] == [jobs[0].key]

    def run_all(jobs, tasks, *, log, **k):
        raise runner.WorkerLost(jobs)

    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", run_all)
    assert main(["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
                 "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--no-plots", "--device", "cpu"]) == 1
    assert "a worker process died" in capsys.readouterr().out


def test_resume_refuses_a_log_of_another_scale(tmp_path, monkeypatch, capsys):
    """(Found as a new user would.) --resume at another --scale kept the old runs beside the
    new: the longer runs won every lr grid. Refused, naming both scales."""
    from flora.bench.__main__ import main

    def run_all(jobs, tasks, *, log, scale, **k):
        with open(log, "a") as fh:
            fh.writelines(json.dumps({**_ok(j), "scale": scale}) + "\n" for j in jobs)

    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", run_all)
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--no-plots", "--device", "cpu"]
    assert main(argv + ["--scale", "0.05"]) == 0
    assert main(argv + ["--scale", "0.1", "--lrs", "1e-3,2e-3", "--resume"]) == 2
    assert "holds runs of another length (--scale 0.05), this command asks for --scale 0.1" in capsys.readouterr().out
    assert main(argv + ["--scale", "0.05", "--lrs", "1e-3,2e-3", "--resume"]) == 0
    assert len(runner.read_log(tmp_path / "s" / "runs.jsonl")) == 3  # the fake run_all logs every job it is given
    # the resumed session's metadata keeps the first session's (the refused one wrote none)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert len(meta["earlier"]) == 1 and "--scale 0.05" in meta["earlier"][0]["command"]
    md = (tmp_path / "s" / "results.md").read_text()
    assert "Earlier parts of this log: Device:" in md
    # and with its command: its runs are in the tables (a probe: only this session's was said)
    assert "--lrs 1e-3 --data" in md.split("Earlier parts of this log:")[1].split("Command:")[0]


def test_resume_refuses_a_log_from_before_runs_recorded_their_scale_by_its_steps(tmp_path, monkeypatch, capsys):
    """(Probe Z44.) Runs logged before 2026-12-03 record no scale, and passed the check at any
    --scale. Their steps tell: a log of 0.05-scale runs is refused at --scale 0.1, taken at 0.05."""
    from flora.bench.__main__ import main
    from flora.bench.suite import workloads

    steps = workloads.scaled(workloads.TASKS["tabular"], 0.05).steps

    def run_all(jobs, tasks, *, log, scale, **k):
        with open(log, "a") as fh:  # as logged before 2026-12-03: steps, no scale
            fh.writelines(json.dumps({**{k: v for k, v in _ok(j).items() if k != "scale"}, "steps": steps}) + "\n"
                          for j in jobs)

    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", run_all)
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--no-plots", "--device", "cpu"]
    assert main(argv + ["--scale", "0.05"]) == 0
    assert main(argv + ["--scale", "0.1", "--resume"]) == 2
    want = workloads.scaled(workloads.TASKS["tabular"], 0.1).steps
    assert f"tabular runs of {steps} steps where this --scale runs {want}" in capsys.readouterr().out
    assert main(argv + ["--scale", "0.05", "--resume"]) == 0


def test_report_only_refuses_a_folder_with_no_runs(tmp_path, monkeypatch, capsys):
    """(Found as a new user would.) --report-only with an --out holding no runs (a typo, a
    folder not yet run) wrote empty tables, created the folder and exited 0. Refused, naming
    the log it looked for; the folder a run wrote to reports as before."""
    from flora.bench.__main__ import main

    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", lambda jobs, tasks, *, log, **k: log.write_text(
        "".join(json.dumps(_ok(j)) + "\n" for j in jobs)))
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--no-plots", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "typo"), "--report-only"]) == 2
    assert f"no runs in {tmp_path / 'typo' / 'runs.jsonl'}" in capsys.readouterr().out
    assert not (tmp_path / "typo").exists()
    assert main(argv + ["--out", str(tmp_path / "s")]) == 0
    assert main(argv + ["--out", str(tmp_path / "s"), "--report-only"]) == 0
    assert "| tabular |" in capsys.readouterr().out


def test_a_new_sweep_keeps_every_earlier_log_and_says_where(tmp_path, monkeypatch, capsys):
    """Without --resume the old runs.jsonl is set aside: a second set-aside overwrote the
    first's runs.previous.jsonl (found by a probe). Each is kept, under a numbered name,
    and the command prints where it went."""
    from flora.bench.__main__ import main

    lrs = iter(["1e-3", "2e-3", "4e-3"])
    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", lambda jobs, tasks, *, log, **k: log.write_text(
        "".join(json.dumps(_ok(j)) + "\n" for j in jobs)))
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--scale", "0.04",
            "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--no-plots", "--device", "cpu"]
    for _ in range(3):
        assert main(argv + ["--lrs", next(lrs)]) == 0
    out = capsys.readouterr().out
    s = tmp_path / "s"
    assert [r["lr"] for r in runner.read_log(s / "runs.previous.jsonl")] == [1e-3]
    assert [r["lr"] for r in runner.read_log(s / "runs.previous.2.jsonl")] == [2e-3]
    assert [r["lr"] for r in runner.read_log(s / "runs.jsonl")] == [4e-3]
    assert f"the old one is now {s / 'runs.previous.jsonl'}" in out and f"{s / 'runs.previous.2.jsonl'}" in out
    # the report files made from each go with it (probe Z44: left, they described the old runs
    # beside a new log that a stopped run had not reported yet)
    assert "--lrs 1e-3" in (s / "results.previous.md").read_text()
    assert "--lrs 2e-3" in (s / "results.previous.2.md").read_text()
    assert "--lrs 4e-3" in (s / "results.md").read_text()
    assert (s / "results.previous.csv").exists() and (s / "meta.previous.2.json").exists()


def test_report_only_takes_the_primary_kappa_of_the_run(tmp_path, monkeypatch):
    """--report-only after a --kappas 50 sweep reported at the CLI's default kappa (found by
    a probe): the run's meta.json names its kappas; a --kappas given now still wins."""
    from flora.bench.__main__ import main
    from flora.bench.suite import cli

    k = 50 if space.KAPPA != 50 else 70
    seen = []
    monkeypatch.setattr(data, "prepare", lambda f, **kw: f)
    monkeypatch.setattr(runner, "run_all", lambda jobs, tasks, *, log, **kw: log.write_text(
        "".join(json.dumps(_ok(j)) + "\n" for j in jobs)))
    report = cli.report
    monkeypatch.setattr(cli, "report", lambda out, tasks, kappa, meta, **kw: seen.append(kappa) or report(
        out, tasks, kappa, meta, **kw))
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s"), "--no-plots", "--device", "cpu"]
    assert main(argv + ["--kappas", str(k)]) == 0
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["kappas"] == [k]
    assert main(argv + ["--report-only"]) == 0
    assert main(argv + ["--report-only", "--kappas", "7"]) == 0
    assert seen == [k, k, 7]
    # a log copied without its meta.json: the kappa its runs hold (probe Z59: the default's,
    # the goal check then empty)
    (tmp_path / "s" / "meta.json").unlink()
    assert main(argv + ["--report-only"]) == 0
    assert seen[-1] == k and f"kappa {k}" in (tmp_path / "s" / "results.md").read_text()


def test_report_only_on_some_tasks_writes_those_tasks_everywhere(tmp_path, monkeypatch):
    """--report-only --tasks cnn on a run of tabular and cnn: results.md had cnn only, the CSV
    and JSON both (found by a probe); a --tasks with no runs wrote an empty report with exit
    0. Every output now holds the tasks asked for; none run: refused. The command heads the
    report, as every subcommand's does."""
    from flora.bench.__main__ import main

    monkeypatch.setattr(data, "prepare", lambda f, **kw: f)
    monkeypatch.setattr(runner, "run_all", lambda jobs, tasks, *, log, **kw: log.write_text(
        "".join(json.dumps(_ok(j)) + "\n" for j in jobs)))
    out = tmp_path / "s"
    argv = ["suite", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--out", str(out), "--no-plots", "--device", "cpu"]
    assert main(argv + ["--tasks", "tabular,cnn"]) == 0
    assert "Command: `flora-bench suite" in (out / "results.md").read_text()
    assert main(argv + ["--tasks", "cnn", "--report-only"]) == 0
    csv_tasks = {line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]}
    json_tasks = {c["task"] for c in json.loads((out / "results.json").read_text())["chosen"]}
    assert csv_tasks == json_tasks == {"cnn"}
    assert "tabular" not in (out / "results.md").read_text().split("Command:")[1].split("\n", 1)[1]
    # results.json keeps the command that ran the rows, and names the report's own beside it (Z135)
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert "--report-only" not in meta["command"] and "--tasks cnn --report-only" in meta["report_command"]
    assert main(argv + ["--tasks", "vit", "--report-only"]) == 2


def test_prepare_only_makes_no_out_folder(tmp_path, monkeypatch):
    """--prepare-only builds the data folder and nothing else (it had left an empty --out)."""
    from flora.bench.__main__ import main

    monkeypatch.setattr(data, "prepare", lambda f, **kw: f.mkdir(parents=True) or f)
    argv = ["suite", "--prepare-only", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    assert (tmp_path / "d").is_dir() and not (tmp_path / "s").exists()


def test_the_lr_is_chosen_among_those_run_on_the_most_seeds_and_a_better_one_on_fewer_is_said():
    """A mean over one seed is not compared with a mean over three (the probe's case: lr 2e-3
    on seed 0 alone, 1.05, won against 1e-3's three-seed 1.10 though 1e-3 was better on seed
    0); the report says that 2e-3 was better on the seed both ran."""
    rows = _rows({("cnn", "x", 1e-3, 0): (1.00, 1.0), ("cnn", "x", 1e-3, 1): (1.20, 1.2),
                  ("cnn", "x", 1e-3, 2): (1.10, 1.1), ("cnn", "x", 2e-3, 0): (1.05, 1.05),
                  ("cnn", "y", 1e-3, 0): (1.00, 1.0), ("cnn", "y", 1e-3, 1): (1.20, 1.2),
                  ("cnn", "y", 1e-3, 2): (1.10, 1.1), ("cnn", "y", 2e-3, 0): (0.90, 0.9)})
    got = {c["optimizer"]: c for c in score.choose(rows)}
    assert (got["x"]["lr"], got["x"]["seeds"], got["x"]["notes"]) == (1e-3, 3, [])
    assert (got["y"]["lr"], got["y"]["seeds"]) == (1e-3, 3)
    assert got["y"]["notes"] == ["lr 0.002 ran on 1 seed(s) and beat the chosen lr 0.001 on the 1 they share: "
                                 "run it on every seed to compare"]
    md = score.markdown(score.choose(rows), {}, [], {}, ["cnn"])
    assert "## Warnings" in md and "- cnn y: lr 0.002 ran on 1 seed(s)" in md
    # a tie goes to the lower lr, whatever the log's order
    tie = _rows({("cnn", "z", 2e-3, 0): (1.0, 1.0), ("cnn", "z", 1e-3, 0): (1.0, 2.0)})
    assert score.choose(tie)[0]["lr"] == 1e-3 and score.choose(tie[::-1])[0]["lr"] == 1e-3


def test_a_candidate_that_diverged_on_a_seed_at_every_lr_ranks_last_not_first():
    """Before, every lr's mean was infinite, the lowest lr was taken, and its test loss was the
    mean of the two seeds that survived: the candidate ranked first."""
    vals = {("cnn", space.FLOOR, 1e-3, s): (1.0, 1.5) for s in range(3)}
    vals.update({("cnn", space.TARGET, 1e-3, s): (0.9, 1.4) for s in range(3)})
    vals.update({("cnn", "flora-r8-bad", lr, s): (0.5, 1.1) for lr in (1e-3, 2e-3) for s in range(3)})
    vals.update({("cnn", "flora-r8-good", 1e-3, s): (0.8, 1.3) for s in range(3)})
    rows = _rows(vals)
    for r in rows:
        if r["optimizer"] == "flora-r8-bad" and r["seed"] == 2:
            r.update(status="diverged", val_loss=None, test_loss=None)
    chosen = score.choose(rows)
    bad = next(c for c in chosen if c["optimizer"] == "flora-r8-bad")
    assert (bad["diverged"], bad["seeds"], bad["test_loss"]) == (1, 3, None)
    ranks = score.ranking(chosen, space.KAPPA, ["cnn"])
    assert [r["optimizer"] for r in ranks][-1] == "flora-r8-bad"
    assert ranks[-1]["diverged"] == ["cnn"] and ranks[-1]["worst"] is None
    assert ranks[0]["worst"] == pytest.approx(1.1 / 1.5) or ranks[0]["optimizer"] != "flora-r8-bad"
    checks = {g["optimizer"]: g for g in score.goal_check(chosen, ["cnn"])}
    assert not checks["flora-r8-bad"]["beats_floor"] and not checks["flora-r8-bad"]["matches_target"]
    md = score.markdown(chosen, score.gaps(chosen), ranks, {}, ["cnn"])
    assert "| flora-r8-bad | " + str(space.KAPPA) + " | diverged on cnn |" in md
    assert "diverged (1 of 3 seeds) lr 0.001" in md
    # every run diverged: listed in the ranking, not dropped
    for r in rows:
        if r["optimizer"] == "flora-r8-bad":
            r.update(status="diverged", val_loss=None, test_loss=None)
    ranks = score.ranking(score.choose(rows), space.KAPPA, ["cnn"])
    assert ranks[-1]["optimizer"] == "flora-r8-bad" and ranks[-1]["diverged"] == ["cnn"]


def test_a_crashed_seed_is_said_and_a_rerun_replaces_it():
    rows = _rows({("cnn", "x", 1e-3, s): (1.0 + s, 1.0 + s) for s in range(2)})
    rows += _rows({("cnn", "x", 2e-3, 0): (0.5, 0.5)})
    rows.append({"task": "cnn", "optimizer": "x", "lr": 2e-3, "seed": 1, "kappa": space.KAPPA,
                 "status": "error: RuntimeError: killed"})
    c = score.choose(rows)[0]
    assert c["lr"] == 1e-3 and c["seeds"] == 2  # 2e-3 has one finished seed of two
    assert "lr 0.002 seed 1: error: RuntimeError: killed (run again with --resume)" in c["notes"]
    rows += _rows({("cnn", "x", 2e-3, 1): (0.6, 0.6)})  # the rerun
    c = score.choose(rows)[0]
    assert (c["lr"], c["seeds"], c["notes"]) == (2e-3, 2, [])


def test_an_ok_seed_without_a_test_loss_is_said():
    rows = _rows({("cnn", "x", 1e-3, s): (1.0, 1.0 + s) for s in range(3)})
    rows[2]["test_loss"] = None
    c = score.choose(rows)[0]
    assert c["test_loss"] == pytest.approx(1.5)
    assert c["notes"] == ["1 of 3 seeds at lr 0.001 have no test loss; the mean is over the others"]


def test_report_with_floor_and_target_on_no_common_seed_does_not_crash():
    rows = _rows({("cnn", space.FLOOR, 1e-3, 0): (1.0, 1.0), ("cnn", space.TARGET, 1e-3, 1): (0.9, 0.9)})
    chosen = score.choose(rows)
    md = score.markdown(chosen, score.gaps(chosen), [], {}, ["cnn"])
    assert "| cnn | 1.0000 | 0.9000 | - | - | no seed in common |" in md


def test_a_single_lr_is_marked_as_the_only_one_tried():
    c = score.choose(_rows({("cnn", "x", 1e-3, 0): (1.0, 1.0)}))[0]
    assert c["edge"] == "only"


def test_lr_extension_finishes_an_extension_lr_begun_on_some_seeds():
    """A sweep killed inside an extension round (or resumed with more seeds): the extension
    lr ran on one seed of three. Before, its one-seed mean made it look interior and it was
    never run on the others; now it is finished first, and decided on after."""
    grid = (1e-3, 2e-3, 4e-3)
    jobs = [space.Job("cnn", "up", lr, s) for lr in grid for s in range(3)]
    vals = {("cnn", "up", lr, s): 1.0 - lr * 10 + 0.01 * s for lr in grid for s in range(3)}
    vals["cnn", "up", 8e-3, 0] = 5.0  # the extension, seed 0 only, and bad on it
    got = sorted((j.lr, j.seed) for j in space.extensions(jobs, _ext_rows(vals), cap=2))
    assert got == [(8e-3, 1), (8e-3, 2)], got
    vals["cnn", "up", 8e-3, 1] = vals["cnn", "up", 8e-3, 2] = 5.0  # finished: interior now, nothing more
    assert space.extensions(jobs, _ext_rows(vals), cap=2) == []
    # a grid lr with a crashed seed: no verdict on the edge (it would go the wrong way)
    vals = {("cnn", "up", lr, s): 1.0 - lr * 10 for lr in grid for s in range(3)}
    del vals["cnn", "up", 4e-3, 1]
    assert space.extensions(jobs, _ext_rows(vals), cap=2) == []


def test_a_floor_that_diverged_on_a_seed_is_scored_on_the_others_and_said():
    """The floor is the yardstick: marked diverged, every ratio to it went missing and the
    ranking emptied (the review). It is scored on the seeds that finished, with a warning."""
    vals = {("t", space.FLOOR, 1e-3, 0): (1.0, 1.1), ("t", space.FLOOR, 1e-3, 1): (1.0, 1.1)}
    vals.update({("t", space.TARGET, 1e-3, s): (0.8, 0.8) for s in (0, 1)})
    vals.update({("t", "flora-r8-x", 1e-3, s): (0.7, 0.71) for s in (0, 1)})
    rows = _rows(vals)
    rows[1].update(status="diverged", val_loss=None, test_loss=None)  # the floor, seed 1
    chosen = score.choose(rows)
    floor = next(c for c in chosen if c["optimizer"] == space.FLOOR)
    assert (floor["test_loss"], floor["diverged"], floor["seeds"]) == (1.1, 0, 1)
    assert floor["notes"] == ["diverged on 1 of 2 seeds at every lr run on 2; its figures are the mean of the others"]
    ranks = score.ranking(chosen, space.KAPPA, ["t"])
    assert [r["optimizer"] for r in ranks] == ["flora-r8-x", space.TARGET, space.FLOOR]
    assert ranks[0]["worst"] == pytest.approx(0.71 / 1.1)


def test_an_lr_on_fewer_seeds_does_not_rescue_a_candidate_that_diverged_at_every_lr_on_all():
    """Seed 1 diverged at both grid lrs; a third lr ran on seed 0 only (an extension begun
    before a --seeds resume). The fallback took that one-seed lr, and the candidate ranked
    first (the review); now it is diverged, last, and the one-seed lr is said."""
    vals = {("t", space.FLOOR, 1e-3, s): (1.0, 1.0) for s in (0, 1)}
    vals.update({("t", "flora-r8-x", lr, s): (0.5, 0.6) for lr in (1e-3, 2e-3) for s in (0, 1)})
    vals[("t", "flora-r8-x", 4e-3, 0)] = (0.5, 0.6)
    rows = _rows(vals)
    for r in rows:
        if r["optimizer"] == "flora-r8-x" and r["seed"] == 1:
            r.update(status="diverged", val_loss=None, test_loss=None)
    c = next(c for c in score.choose(rows) if c["optimizer"] == "flora-r8-x")
    assert c["diverged"] == 1 and c["test_loss"] is None and c["lr"] == 1e-3
    assert "lr 0.004 did not diverge on its 1 seed(s) of 2: run it on every seed" in c["notes"]
    assert score.ranking(score.choose(rows), space.KAPPA, ["t"])[-1]["optimizer"] == "flora-r8-x"


def test_resume_says_finetune_runs_that_record_no_base(tmp_path, monkeypatch, capsys):
    """Since 2026-12-06 seed s fine-tunes its own base (init 4321 + s), and each finetune
    row records it (base_init); a log from before, whose seeds 1+ fine-tuned one shared
    base, resumed without a word and its runs mixed with new ones (a review). Said, with
    the count; a log whose rows record their base is not."""
    from flora.bench.__main__ import main

    monkeypatch.setattr(data, "prepare", lambda f, **k: f)
    monkeypatch.setattr(runner, "run_all", lambda jobs, tasks, *, log, **k: {})
    out = tmp_path / "s"
    out.mkdir()
    rows = [{**_ok(space.Job("finetune", "adafactor", 1e-3, s)), "scale": 1.0} for s in (0, 1, 2)]
    argv = ["suite", "--tasks", "tabular", "--forms=", "--baselines", "adafactor", "--seeds", "1", "--lrs", "1e-3",
            "--data", str(tmp_path / "d"), "--out", str(out), "--no-plots", "--device", "cpu", "--resume"]
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(argv) == 0
    assert "holds 2 finetune run(s) of seeds above 0 that record no base_init" in capsys.readouterr().out
    (out / "runs.jsonl").write_text("".join(json.dumps({**r, "base_init": 4321 + r["seed"]}) + "\n" for r in rows))
    assert main(argv) == 0
    assert "base_init" not in capsys.readouterr().out


def test_a_finetune_run_records_its_base(tmp_path, monkeypatch):
    from flora.bench.suite import workloads

    folder = data.prepare(tmp_path, only=("kjv_bytes.pt", data.BBC_BYTES))
    monkeypatch.setattr(workloads.Finetune, "BASE_STEPS", 40)
    runner._init(str(folder), "cpu", 0.02, 1)
    r = runner.run_job(space.Job("finetune", "adafactor", 1e-3, 2))
    assert r["base_init"] == 4323 and r["status"] == "ok"
    assert (folder / "finetune_base_cpu_2_seed2.pt").exists()
