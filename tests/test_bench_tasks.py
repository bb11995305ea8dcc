"""The training benchmark's tasks and settings, checked without training (probe Z85: the
tests trained only the smoke pretrain task, so a task evaluating on its training split,
micro-batches all alike or an option ignored passed every test). Synthetic splits stand
in for the data, so each check is exact."""

from __future__ import annotations

import argparse
import dataclasses
import types

import torch

from flora.bench import config, train
from flora.bench import tasks as T


class _SeenLM(torch.nn.Module):
    """Records the tokens it is shown."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, input_ids, labels):
        self.seen += input_ids.view(-1).tolist()
        return types.SimpleNamespace(loss=torch.tensor(1.0))


def _lm_task(tau=2, seed=3):
    task = T.PretrainTask(dataclasses.replace(config.SIZES["smoke"]["pretrain"], tau=tau), "/nonexistent", seed=seed)
    task.streams = {"train": torch.arange(0, 1000) % 200, "val": torch.full((1000,), 250), "test": torch.full((1000,), 251)}
    return task


def test_a_language_task_trains_on_train_and_scores_each_split_on_its_own():
    task = _lm_task()
    micro0, micro1 = task.batch(0, 0, "cpu")[0]["input_ids"], task.batch(0, 1, "cpu")[0]["input_ids"]
    assert not torch.equal(micro0, micro1)  # each micro-batch its own text
    assert max(micro0.view(-1).tolist()) < 200  # never the held-out streams
    assert not torch.equal(micro0, _lm_task(seed=4).batch(0, 0, "cpu")[0]["input_ids"])  # a seed's own order
    model = _SeenLM()
    task.evaluate(model, "test", "cpu")
    assert set(model.seen) == {251} and len(model.seen) == 256
    model.seen.clear()
    task.evaluate(model, "val", "cpu", small=True)
    assert set(model.seen) == {250} and len(model.seen) == 128  # the small (mid-run) evaluation is the smaller


def test_the_classify_task_scores_its_held_out_ids():
    cfg = dataclasses.replace(config.SIZES["smoke"]["classify"], tau=2, batch=2, eval_examples=16)
    task = T.ClassifyTask(cfg, "/nonexistent", seed=1)

    def split(base, n):
        return {"input_ids": (torch.arange(n) + base).view(n, 1).int(), "attention_mask": torch.ones(n, 1, dtype=torch.int8),
                "labels": torch.zeros(n, dtype=torch.long)}

    task.splits = {"train": split(0, 40), "val": split(1000, 40), "test": split(2000, 40)}
    task.order = torch.arange(40)
    assert (task.tau, task.metric) == (2, "accuracy")
    assert task.batch(1, 0, "cpu")[0]["input_ids"].view(-1).tolist() == [4, 5]
    seen = []

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels):
            seen.extend(input_ids.view(-1).tolist())
            logits = torch.zeros(len(labels), 5)
            logits[:, 0] = 1
            return types.SimpleNamespace(loss=torch.tensor(0.5), logits=logits)

    task.evaluate(Model(), "test", "cpu")
    assert min(seen) == 2000 and len(seen) == 16
    seen.clear()
    task.evaluate(Model(), "val", "cpu", small=True)
    assert min(seen) >= 1000 and len(seen) == 4


def test_the_options_reach_the_runs():
    """--lr-points, --steps (with the evaluation interval), --threads and the quick
    preset's figures."""
    assert config.task_config("quick", "classify", lr_points=3).lr_points == 3
    smoke = config.task_config("smoke", "pretrain", steps=2)
    assert (smoke.steps, smoke.eval_every) == (2, 2)
    assert config.SIZES["quick"]["pretrain"].steps == 100 and config.TRAIN_GOALS[0].tolerance == 0.01
    a = argparse.Namespace(lrs={"adamw": (1e-3,), "adam": (5e-3,)}, seed=0, seeds=1, tau=None, threads=2)
    jobs, _ = train.plan(a, {"pretrain": config.task_config("smoke", "pretrain", optimizers=["adamw"])}, {}, "cpu",
                         "c")
    assert [(j.lr, j.threads) for j in jobs] == [(1e-3, 2)]


def test_a_run_is_scored_on_the_validation_and_the_test_split_each():
    from flora.bench import runner
    from flora.bench.records import RunResult

    class Task:
        def evaluate(self, model, split, device, small=False):
            return {"loss": {"val": 1.0, "test": 2.0}[split]}

    res = RunResult("pretrain", "adamw", 1e-3, 0, "ok", steps_done=4)
    loop = runner._Loop(train=[(1, 3.0), (2, 2.5)], step_times=[0.2, 0.1, 0.1], tokens_per_step=8)
    runner._evaluate(Task(), None, "cpu", res, loop)
    assert (res.val_loss, res.test_loss, res.train_loss, res.median_step_s) == (1.0, 2.0, 2.5, 0.1)


def test_a_language_task_scores_windows_spread_over_its_split():
    # pretrain's held-out split is KJV then BBC: its head alone was 8 KB of Revelation.
    task = _lm_task()
    b, t = task.cfg.batch, task.cfg.seq
    half = 40 * t
    task.streams["test"] = torch.cat([torch.full((half,), 251), torch.full((half,), 252)])
    model = _SeenLM()
    task.evaluate(model, "test", "cpu")
    seen = model.seen
    assert len(seen) == task.cfg.eval_batches * b * t
    assert seen.count(251) == seen.count(252)  # both parts, in proportion
    assert seen[-1] == 252  # the last window ends the split


def test_eval_windows_start_and_end_the_stream_and_never_overlap():
    assert T.eval_starts(1000, 100, 3) == [0, 450, 900]
    for n, t, k in ((1000, 128, 100), (1024, 128, 8), (5000, 7, 1000), (300, 128, 5)):
        s = T.eval_starts(n, t, k)
        assert s[0] == 0 and s[-1] == n - t and len(s) == min(k, n // t)
        assert all(b - a >= t for a, b in zip(s, s[1:]))
    assert T.eval_starts(200, 128, 4) == [0]  # room for one window
    assert T.eval_starts(100, 128, 4) == [0]  # a split shorter than a window: one short window
