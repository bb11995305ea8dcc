"""The accumulator's cycle at its edges (found by a review, probe Z53): a backward pass
that raised, experts routed in turn, an option changed mid-cycle, a parameter resized
between cycles, and what a checkpoint must carry for a resume to continue the same run."""

import copy
import warnings

import pytest
import torch

from flora import CompressedAccumulator


class Experts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, which=None):
        if which is None:
            return self.a(x) + self.b(x)
        return (self.a if which == 0 else self.b)(x)


def _build(fused=False, tau=2, rank=2, **kw):
    torch.manual_seed(0)
    m = Experts()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    return m, opt, CompressedAccumulator(m, rank=rank, tau=tau, optimizer=opt, fused=fused, **kw)


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_refuses_a_cycle_whose_backward_raised_midway(fused):
    """A backward that raised after some parameters got their last micro-batch leaves them
    done with no pass ending the cycle: state_dict() had saved it (normal mode; the load
    then called it damaged) or failed with a bare KeyError (fused mode)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    acc = CompressedAccumulator(m, rank=2, tau=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), fused=fused)
    x = torch.randn(4, 8)
    m(x).sum().backward()
    h = m[0].weight.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        m(x).sum().backward()
    h.remove()
    with pytest.raises(RuntimeError, match=r"complete for some parameters \('0.bias', '1.weight', '1.bias'\) but "
                                           r"the backward pass that completed them did not finish"):
        acc.state_dict()
    acc.discard_cycle()
    assert acc.state_dict()["counts"].tolist() == [0, 0, 0, 0]


def test_micro_step_counts_passes_when_experts_take_turns():
    """Two experts used in alternate passes each see half of them: micro_step had reported
    the most one parameter saw (1 after 2 passes), which made DDP's tau-th forward count as
    early and be refused."""
    m, opt, acc = _build(tau=3)
    x = torch.randn(4, 8)
    for i in range(2):
        m(x, i % 2).sum().backward()
        assert acc.micro_step == i + 1
    m(x, 0).sum().backward()  # the tau-th: the cycle waits for the step
    assert acc.micro_step == 3
    opt.step()
    assert acc.micro_step == 0 and acc.cycle == 1


@pytest.mark.parametrize("name,value", [("scaler", None), ("tau", 3), ("max_grad_norm", 1.0)])
def test_options_that_scale_the_sum_change_on_a_cycle_boundary_only(name, value):
    """The scaler set to None after a scaled micro-batch had given a step 512x too large,
    silently (fused mode, scale 1024)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 8, bias=False)
    sc = torch.amp.GradScaler("cpu", init_scale=1024.0)
    acc = CompressedAccumulator(m, rank=None, tau=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), fused=True,
                                scaler=sc)
    sc.scale(m(torch.randn(3, 8)).sum()).backward()
    # the way out named (a probe retried with finish_cycle(), a run one cycle ahead of a fresh one)
    with pytest.raises(RuntimeError, match=f"CompressedAccumulator.{name} can change on a cycle boundary only "
                                           r"\(after the step, finish_cycle\(\) .* discard_cycle\(\)"):
        setattr(acc, name, value)
    acc.scaler = sc  # the same object: no change
    acc.discard_cycle()
    setattr(acc, name, value)  # on a boundary: taken
    assert getattr(acc, name) is value or getattr(acc, name) == value


def test_settable_options_say_what_they_take():
    m, opt, acc = _build()
    for bad in (1, None):
        with pytest.raises(TypeError, match="exact_last must be True or False once the accumulator is built"):
            acc.exact_last = bad
    acc.remove()
    with pytest.raises(RuntimeError, match=r"CompressedAccumulator.tau: this accumulator was removed"):
        acc.tau = 4


def test_a_parameter_resized_between_cycles_below_the_rank_is_refused_by_name():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    opt = torch.optim.SGD([p], lr=0.1)
    acc = CompressedAccumulator([p], rank=4, tau=2, optimizer=opt)
    for _ in range(2):
        p.square().sum().backward()
    opt.step()
    opt.zero_grad()
    p.data = torch.randn(6, 16)  # still above the rank: taken, drawn for the new shape
    for _ in range(2):
        p.square().sum().backward()
    assert p.grad.shape == (6, 16)
    opt.step()
    opt.zero_grad()
    p.data = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match=r"parameter 'params.0' was resized to \(3, 16\) since the accumulator "
                                           r"was built.*projected dim 3 <= rank 4"):
        p.square().sum().backward()


def _fake_accelerate(monkeypatch, sync=True, num_steps=2) -> dict:
    """accelerate's process-wide gradient state, as the accumulator reads it, in a module of
    this test's own: its flags (``sync_gradients``, ``plugin_kwargs``), to set."""
    import sys
    import types

    st = types.ModuleType("accelerate.state")

    class GradientState:
        _shared_state = {"sync_gradients": sync, "plugin_kwargs": {"num_steps": num_steps}}

    st.GradientState = GradientState
    monkeypatch.setitem(sys.modules, "accelerate.state", st)
    return GradientState._shared_state


def test_a_resume_continues_to_follow_accelerate_in_the_next_cycle(monkeypatch):
    """A cycle with an unsynced backward (accelerate's flag) makes the next cycle follow
    accelerate too. The checkpoint had folded that into the open cycle's flag, so a resumed
    run left a short synced cycle open that the uninterrupted run closed."""
    flags = _fake_accelerate(monkeypatch)
    x = torch.randn(2, 8)

    def build():
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 8)
        return m, CompressedAccumulator(m, rank=2, tau=2, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))

    m, acc = build()
    flags["sync_gradients"] = False
    m(x).sum().backward()
    sd = acc.state_dict()
    assert sd["unsynced"] == 1
    m2, acc2 = build()
    acc2.load_state_dict(copy.deepcopy(sd))
    for model, a in ((m, acc), (m2, acc2)):
        flags["sync_gradients"] = True
        model(x).sum().backward()  # micro-batch 2, synced: the cycle ends
        model.zero_grad()  # after the step
        model(x).sum().backward()  # the next cycle, ended by accelerate after 1 (its dataloader's end)
        assert (a.cycle, a.micro_step) == (2, 0)


def test_load_refuses_a_backward_count_of_a_closed_cycle_and_clears_what_the_live_cycle_left():
    m, opt, acc = _build(tau=4)
    boundary = acc.state_dict()
    bad = copy.deepcopy(boundary)
    bad["backwards"] = 9
    with pytest.raises(ValueError, match=r"state_dict\['backwards'\] must be below tau=4"):
        acc.load_state_dict(bad)
    # a live cycle waiting to be closed (b got fewer gradients), rolled back to a boundary:
    # every .grad it left (sums, estimates) goes, not the dense ones alone
    m, opt, acc = _build(tau=2)
    boundary = acc.state_dict()
    x = torch.randn(3, 8)
    m(x).sum().backward()
    m(x, 0).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.load_state_dict(copy.deepcopy(boundary))
    assert all(p.grad is None for p in m.parameters()), [n for n, p in m.named_parameters() if p.grad is not None]


def test_the_trainer_callback_takes_accelerates_scaler_after_dropping_a_leftover_window():
    """A train() started again mid-window (fused mode): the callback drops the leftover
    window and takes accelerate's fp16 GradScaler. It took the scaler first, which a scaler
    now refuses mid-cycle (probe Z56, a regression of this change)."""
    from types import SimpleNamespace

    from flora import AccumulatorCallback

    m, opt, acc = _build(fused=True, tau=2)
    m(torch.randn(3, 8)).sum().backward()
    assert acc.micro_step == 1
    scaler = torch.amp.GradScaler("cpu")
    wrapped = SimpleNamespace(optimizer=opt, scaler=scaler)  # accelerate's AcceleratedOptimizer, as read
    AccumulatorCallback(acc).on_train_begin(SimpleNamespace(gradient_accumulation_steps=2, max_grad_norm=0),
                                            SimpleNamespace(global_step=0, stateful_callbacks={}), None,
                                            optimizer=wrapped)
    assert acc.scaler is scaler and acc.micro_step == 0


def _linear_with(tau):
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 8)
    return m, CompressedAccumulator(m, rank=2, tau=tau, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def test_accelerates_sync_ends_only_a_cycle_that_follows_it(monkeypatch):
    """A synced flag is accelerate's "last micro-batch" only in a cycle that accelerate
    drives (an unsynced backward seen): an Accelerator merely alive in the process (its
    flag True by default) must not end a plain loop's cycles (read so, a DDP loop's early
    sync was taken as the cycle's end: two cycles of one micro-batch, silently, probe Z78)."""
    from flora.accumulation.cycle import Cycle
    from flora.accumulation.integrations import accelerate_syncs

    _fake_accelerate(monkeypatch, sync=True, num_steps=1)
    c = Cycle.start(2)
    assert not accelerate_syncs(c)
    c.unsynced = True
    assert accelerate_syncs(c)


def test_a_tau_longer_than_accelerates_two_steps_is_refused(monkeypatch):
    """accelerator.accumulate() with gradient_accumulation_steps=2 under tau=3: every cycle
    would end short, after 2 (only steps of 4 against tau 2 had been tested)."""
    flags = _fake_accelerate(monkeypatch, num_steps=2)
    m, acc = _linear_with(3)
    flags["sync_gradients"] = False
    with pytest.raises(ValueError, match=r"CompressedAccumulator\(tau=3\) under accelerate with "
                                         r"gradient_accumulation_steps=2: the two must agree; set acc.tau = 2"):
        m(torch.randn(2, 8)).sum().backward()
    # refused at the first backward, nothing is left behind: autograd had written the first
    # parameter's gradient before the hook, and a rebuilt accumulator took it in (a probe)
    assert all(p.grad is None for p in m.parameters()) and acc.micro_step == 0
    acc.tau = 2  # the way out named
    x = torch.randn(2, 8)
    m(x).sum().backward()
    flags["sync_gradients"] = True
    m(x).sum().backward()
    assert acc.cycle == 1 and all(p.grad is not None for p in m.parameters())  # a cycle of 2, closed


def test_a_trainer_checkpoint_loaded_into_a_plain_loop_counts_tau(monkeypatch):
    """A state saved under the Trainer's callback carries its "driven" mark; loaded into a
    plain loop (accelerate imported, its flag True outside the Trainer) every backward
    closed a cycle (review Z101). The mark is the callback's to set: the loop counts tau."""
    _fake_accelerate(monkeypatch, sync=True, num_steps=1)
    m, acc = _linear_with(2)
    acc._driven_by_accelerate()  # what AccumulatorCallback.on_train_begin does
    saved = acc.state_dict()
    assert saved["driven"] == 1
    acc.remove()
    m, acc = _linear_with(2)
    acc.load_state_dict(saved)
    m(torch.randn(2, 8)).sum().backward()
    assert (acc.cycle, acc.micro_step) == (0, 1)
    m(torch.randn(2, 8)).sum().backward()
    assert (acc.cycle, acc.micro_step) == (1, 0)


def test_under_the_trainer_a_stale_unsynced_flag_does_not_hide_a_longer_window(monkeypatch):
    """The callback marks the accumulator driven by accelerate: an unsynced flag left by an
    earlier run stopped mid-window is then live, and two unsynced passes at tau=2 are a
    window longer than tau, refused (not trusting the flag, the cycle closed halfway)."""
    flags = _fake_accelerate(monkeypatch, sync=False, num_steps=1)
    m, acc = _linear_with(2)
    acc._driven_by_accelerate()  # what AccumulatorCallback.on_train_begin does
    m(torch.randn(2, 8)).sum().backward()
    with pytest.raises(ValueError, match="gradient_accumulation_steps > tau=2"):
        m(torch.randn(2, 8)).sum().backward()
    assert flags["sync_gradients"] is False


def test_a_wrappers_scaler_is_taken_only_if_it_is_a_grad_scaler():
    """accelerate keeps a backend's own loss scaler in the same attribute: a fused
    accumulator on such a wrapper takes none (taken, each backward failed on its missing
    GradScaler methods)."""
    from flora.accumulation.integrations import wrapper_scaler

    class Wrapped:
        def __init__(self, opt, scaler):
            self.optimizer, self.scaler = opt, scaler

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert wrapper_scaler(Wrapped(opt, object())) is None
    grad_scaler = torch.amp.GradScaler("cpu")
    assert wrapper_scaler(Wrapped(opt, grad_scaler)) is grad_scaler
