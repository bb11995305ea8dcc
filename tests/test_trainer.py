"""Drop-in use with the Hugging Face Trainer: Flora as its optimizer, CompressedAccumulator
on its gradient-accumulation loop."""

import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import flora
from flora.projection import ACCUMULATION_STREAM, compress, decompress, make_projection, projection_seed


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def _train(tmp_path, rank, *, n=32, epochs=None, lr=1e-2, sched=None, tau=2, steps=2, callback=False,
           resume=None, max_steps=4, max_grad_norm=1.0, momentum_dtype=None, compile=False, also=(), **more):
    model = _llama()
    opt = flora.Flora(model.parameters(), lr=lr, rank=4, beta1=0.9, momentum_dtype=momentum_dtype, compile=compile)
    acc = None if rank == "none" else flora.CompressedAccumulator(model, rank=rank, tau=tau, optimizer=opt, seed=1)
    length = dict(max_steps=max_steps) if epochs is None else dict(num_train_epochs=epochs)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                             gradient_accumulation_steps=steps, report_to=[], use_cpu=True,
                             max_grad_norm=max_grad_norm, disable_tqdm=True, seed=0, logging_steps=1,
                             **{"save_strategy": "no", **length, **more})
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(n),
                      optimizers=(opt, None if sched is None else sched(opt)),
                      callbacks=([flora.AccumulatorCallback(acc)] if callback else []) + list(also))
    trainer.train(resume_from_checkpoint=resume)
    model.log = trainer.state.log_history
    return model, acc


def test_dense_accumulator_inside_trainer_changes_nothing(tmp_path):
    ref, _ = _train(tmp_path / "a", "none")
    got, acc = _train(tmp_path / "b", None)  # rank=None: hooks attached, every parameter dense
    assert acc.cycle == 4
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)


def test_compressed_accumulator_inside_trainer(tmp_path):
    """Each optimizer step sees, for a compressed matrix, decompress(compress(G_1)) + G_2
    under that cycle's projection: recorded per micro-batch by a hook that runs before the
    accumulator's, and at the step by a pre-hook. Clipping is off (max_grad_norm huge)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    names = [n for n, _ in model.named_parameters()]
    index = names.index("model.layers.0.mlp.up_proj.weight")  # 64 x 32: projects the 32 columns
    w = dict(model.named_parameters())[names[index]]
    micro, seen = [], []
    w.register_post_accumulate_grad_hook(lambda p: micro.append(p.grad.detach().clone()))
    opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    opt.register_step_pre_hook(lambda *_: seen.append(w.grad.detach().clone()))
    acc = flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, seed=1)
    assert acc.plan()[index]["proj_dim"] == 1
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=4, report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=1e9,
                             disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None)).train()
    assert acc.cycle == 4 and acc.micro_step == 0 and len(seen) == 4 and len(micro) == 8
    for cycle in range(4):
        a = make_projection("orthonormal", projection_seed(1, index, cycle, ACCUMULATION_STREAM), 4, 32, unbiased=True)
        g1, g2 = micro[2 * cycle], micro[2 * cycle + 1]
        torch.testing.assert_close(seen[cycle], decompress(compress(g1, a, 1), a, 1) + g2, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(seen[cycle], g1 + g2, atol=1e-4)  # compressed, not the dense sum


def test_epochs_with_a_short_last_cycle(tmp_path):
    """36 samples in batches of 4 are 9 micro-batches an epoch: with tau=2 every epoch ends
    with a cycle of one. Dense: bit-identical to the Trainer alone. Compressed: every step
    (clipping off) sees its cycle's estimate, computed by hand from the micro-batch gradients
    recorded by a hook that runs before the accumulator's: decompress(compress(G_1)) + G_2
    under that cycle's projection, and the short cycles' one gradient exactly."""
    ref, _ = _train(tmp_path / "a", "none", n=36, epochs=2)
    got, acc = _train(tmp_path / "b", None, n=36, epochs=2)
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
    assert acc.cycle == 10 and acc.micro_step == 0

    model = _llama()
    names = [n for n, _ in model.named_parameters()]
    index = names.index("model.layers.1.mlp.down_proj.weight")  # 32 x 64: projects the 32 rows
    w = dict(model.named_parameters())[names[index]]
    micro, seen = [], []
    w.register_post_accumulate_grad_hook(lambda p: micro.append(p.grad.detach().clone()))
    opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    opt.register_step_pre_hook(lambda *_: seen.append(w.grad.detach().clone()))
    acc = flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, seed=1)
    assert acc.plan()[index]["proj_dim"] == 0
    args = TrainingArguments(output_dir=str(tmp_path / "c"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, num_train_epochs=2, report_to=[], save_strategy="no",
                             use_cpu=True, max_grad_norm=1e9, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=_Tokens(36), optimizers=(opt, None)).train()
    assert acc.cycle == 10 and acc.micro_step == 0 and len(seen) == 10 and len(micro) == 18
    sizes = [2, 2, 2, 2, 1] * 2  # micro-batches per step: each epoch ends with a cycle of one
    start = 0
    for cycle, k in enumerate(sizes):
        grads = micro[start:start + k]
        start += k
        a = make_projection("orthonormal", projection_seed(1, index, cycle, ACCUMULATION_STREAM), 4, 32,
                            unbiased=True)
        want = grads[0] if k == 1 else decompress(compress(grads[0], a, 0), a, 0) + grads[1]
        torch.testing.assert_close(seen[cycle], want, rtol=1e-4, atol=1e-6)
        if k == 2:
            assert not torch.allclose(seen[cycle], grads[0] + grads[1], atol=1e-4)  # compressed


def test_resume_with_the_callback_equals_an_uninterrupted_run(tmp_path):
    """Issue 16: a resumed run differed from one that never stopped (weights by 0.022),
    because the Trainer did not save the accumulator. With flora.AccumulatorCallback the
    checkpoint holds its state (plain JSON in trainer_state.json), and a run resumed from
    it, in another output folder, equals the uninterrupted one bit for bit."""
    full, acc = _train(tmp_path / "full", 4, callback=True, save_strategy="steps", save_steps=2)
    assert acc.cycle == 4
    checkpoint = tmp_path / "full" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["flora.CompressedAccumulator"]["cycle"] == 2
    for name in ("optimizer.pt", "scheduler.pt"):  # Flora's state and the schedule, as the Trainer loads them
        torch.load(checkpoint / name, weights_only=True)
    resumed, acc = _train(tmp_path / "resumed", 4, callback=True, resume=str(checkpoint))
    assert acc.cycle == 4
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # without the callback the accumulator restarts its cycles (other projections): not equal
    unsaved, _ = _train(tmp_path / "unsaved", 4, resume=str(checkpoint))
    assert max((a - b).abs().max() for a, b in zip(full.parameters(), unsaved.parameters())) > 1e-4
    # a checkpoint saved without the callback resumes with a warning
    _train(tmp_path / "plain", 4, save_strategy="steps", save_steps=2, max_steps=2)
    with pytest.warns(UserWarning, match="holds no CompressedAccumulator state"):
        _train(tmp_path / "warned", 4, callback=True, resume=str(tmp_path / "plain" / "checkpoint-2"))


def test_a_resume_with_another_gradient_accumulation_steps(tmp_path):
    """A plain Trainer resumes with another gradient_accumulation_steps; with the callback
    it could not (the callback wants tau equal to it, the saved state its own tau; probe
    Z99). A Trainer checkpoint lies between cycles, so the new tau holds: the accumulator
    continues the saved cycle count at tau=4."""
    _train(tmp_path / "full", 4, callback=True, save_strategy="steps", save_steps=2, max_steps=2)
    resumed, acc = _train(tmp_path / "resumed", 4, tau=4, steps=4, callback=True,
                          resume=str(tmp_path / "full" / "checkpoint-2"))
    assert (acc.tau, acc.cycle, acc.micro_step) == (4, 4, 0)


def test_a_trainer_checkpoint_loaded_into_a_plain_loop_counts_tau_from_its_first_backward(tmp_path):
    """The checkpoint of a Trainer run with accumulation (its cycles had unsynced backward
    passes) carried follow_accelerate: a plain loop loading it closed its first cycle after
    one backward, accelerate's flag being True outside the Trainer (review Z104; 0.0014 off
    after one step). A resume under the callback is unchanged (the resume tests above)."""
    _train(tmp_path / "full", 4, callback=True, save_strategy="steps", save_steps=2, max_steps=2)
    state = json.loads((tmp_path / "full" / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["flora.CompressedAccumulator"]
    assert (saved["driven"], saved["follow_accelerate"], saved["unsynced"]) == (1, 0, 0)
    from accelerate.state import GradientState
    assert GradientState()._shared_state.get("sync_gradients", True)  # as the Trainer left it
    model = _llama()
    acc = flora.CompressedAccumulator(model, rank=4, tau=2, seed=1)
    acc.load_state_dict(flora.trainer_callback._from_json(saved))
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(9))
    (model(input_ids=x, labels=x).loss / 2).backward()
    assert (acc.cycle, acc.micro_step) == (2, 1)
    (model(input_ids=x, labels=x).loss / 2).backward()
    assert (acc.cycle, acc.micro_step) == (3, 0)
    acc.remove()


def test_a_fresh_run_with_the_callback_says_nothing_of_a_checkpoint(tmp_path):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _train(tmp_path, 4, callback=True, max_steps=2)
    assert not [w for w in said if "AccumulatorCallback" in str(w.message)]


class _StopMidWindow(TrainerCallback):
    """Stops training after the first micro-batch of the second window (a time budget
    checked at each micro-batch; the Trainer calls on_substep_end for every micro-batch but
    a window's last)."""

    def __init__(self):
        self.substeps = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1
        if self.substeps == 2:
            control.should_training_stop = True


def test_a_checkpoint_saved_at_the_epoch_end_of_a_run_stopped_mid_window_resumes_exactly(tmp_path):
    """Stopped mid-window, the Trainer still ends the epoch and saves (save_strategy="epoch")
    at its last optimizer step, and a resume runs the window again; the callback had
    recorded the open cycle at the epoch's end, and the resume was refused ("backward pass
    2 of this cycle is not the last", probe Z78). It records on cycle boundaries only."""
    full, _ = _train(tmp_path / "full", 4, callback=True)
    _train(tmp_path / "stopped", 4, callback=True, save_strategy="epoch", also=[_StopMidWindow()])
    (checkpoint,) = (tmp_path / "stopped").glob("checkpoint-*")
    assert checkpoint.name == "checkpoint-1"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["flora.CompressedAccumulator"]["cycle"] == 1 and not any(saved["flora.CompressedAccumulator"]["counts"])
    resumed, acc = _train(tmp_path / "resumed", 4, callback=True, resume=str(checkpoint))
    assert acc.cycle == 4
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_resuming_from_a_model_only_checkpoint_says_the_optimizer_starts_again(tmp_path):
    """(Probe Z22.) save_only_model=True writes no optimizer.pt: the Trainer restores the
    model and its own state, the callback the accumulator's cycle, and the optimizer and
    schedule start again, silently. Said now; a checkpoint with the optimizer's state
    resumes without the warning."""
    _train(tmp_path / "model_only", 4, callback=True, save_strategy="steps", save_steps=2, max_steps=2,
           save_only_model=True)
    checkpoint = tmp_path / "model_only" / "checkpoint-2"
    assert not (checkpoint / "optimizer.pt").exists()
    with pytest.warns(UserWarning, match="optimizer state the Trainer did not restore"):
        _train(tmp_path / "resumed", 4, callback=True, resume=str(checkpoint))
    _train(tmp_path / "full", 4, callback=True, save_strategy="steps", save_steps=2, max_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not restore.*")
        _train(tmp_path / "resumed_full", 4, callback=True, resume=str(tmp_path / "full" / "checkpoint-2"))


def test_a_first_cycle_that_is_short_under_the_callback(tmp_path):
    """A run's first cycle may be short: the rest of an epoch after a resume, or an epoch
    of one micro-batch. The Trainer's synced backward must end it before its clipping
    (on here) reads .grad; it crashed in clip_grad_norm_ on the placeholder the open cycle
    leaves there ("more than one element of the written-to tensor refers to a single
    memory location"). Resumed from checkpoint-2 of 5 micro-batches (tau=2: the third
    step's cycle is one micro-batch), the run equals the uninterrupted one bit for bit; a
    fresh epoch of one micro-batch equals the Trainer alone (a cycle of one is exact)."""
    full, acc = _train(tmp_path / "full", 4, n=20, epochs=1, callback=True, save_strategy="steps", save_steps=2)
    assert acc.cycle == 3 and acc.micro_step == 0
    resumed, acc = _train(tmp_path / "resumed", 4, n=20, epochs=1, callback=True,
                          resume=str(tmp_path / "full" / "checkpoint-2"))
    assert acc.cycle == 3 and acc.micro_step == 0
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    ref, _ = _train(tmp_path / "ref", "none", n=4, epochs=1)
    one, acc = _train(tmp_path / "one", 4, n=4, epochs=1, callback=True)
    assert acc.cycle == 1
    for a, b in zip(ref.parameters(), one.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tau, steps, callback, words", [
    (2, 4, False, ["tau=2", "gradient_accumulation_steps > tau=2", "backward pass 2", "discard_cycle()"]),
    (2, 4, True, ["tau=2", "gradient_accumulation_steps=4", "several cycles per optimizer step"]),
    (4, 2, True, ["tau=4", "gradient_accumulation_steps=2", "every cycle short"]),
])
def test_a_tau_that_disagrees_with_the_trainer_is_refused(tmp_path, tau, steps, callback, words):
    """Issue 16: tau=2 under gradient_accumulation_steps=4 closed two cycles per optimizer
    step and compressed the first estimate again. Refused, naming both: by the accumulator
    at the first backward that shows it, by the callback when training starts."""
    with pytest.raises(ValueError) as e:
        _train(tmp_path, 4, tau=tau, steps=steps, callback=callback)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_relative_step_mode_with_its_schedule(tmp_path):
    got, _ = _train(tmp_path / "a", "none", lr=None, sched=flora.RelativeStepSchedule)
    lrs = [e["learning_rate"] for e in got.log if "learning_rate" in e]
    assert lrs == [1e-2] * 4  # min(1e-2, 1/sqrt(t)) for t <= 4

    def warm(opt):  # warmup_init: the relative step grows, 1e-6 t, so a late log shows
        for g in opt.param_groups:
            g["warmup_init"] = True
        return flora.RelativeStepSchedule(opt)

    got, _ = _train(tmp_path / "b", "none", lr=None, sched=warm)
    lrs = [e["learning_rate"] for e in got.log if "learning_rate" in e]
    assert lrs == pytest.approx([1e-6 * t for t in range(1, 5)], rel=1e-12)  # each step's own


def test_resume_with_a_bfloat16_momentum_equals_an_uninterrupted_run(tmp_path):
    """The Trainer's own checkpoint (optimizer.pt, read with weights_only=True) holds the
    bfloat16 momentum as it is, and a run resumed from it equals the uninterrupted one
    bit for bit."""
    full, _ = _train(tmp_path / "full", "none", momentum_dtype="bfloat16", save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    sd = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = [v for s in sd["state"].values() for k, v in s.items() if k in ("exp_avg_c", "exp_avg")]
    assert moments and all(v.dtype == torch.bfloat16 for v in moments)
    assert sd["param_groups"][0]["momentum_dtype"] == "bfloat16"
    resumed, _ = _train(tmp_path / "resumed", "none", momentum_dtype="bfloat16", resume=str(checkpoint))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_compile_survives_the_trainer_and_its_resume(tmp_path):
    """Flora(compile=...) under the Trainer compiles its step, in a run and in one resumed
    from its checkpoint, and the resumed run equals the uninterrupted one bit for bit.
    accelerate's AcceleratedOptimizer reloads the optimizer's state dict to place it, and
    the resume loads the checkpoint's: load_state_dict once reset compile=, so every such
    step ran eagerly (a counting backend saw no graph)."""
    from torch._dynamo.testing import CompileCounter

    full_count, resumed_count = CompileCounter(), CompileCounter()
    full, _ = _train(tmp_path / "full", "none", save_strategy="steps", save_steps=2, compile=full_count)
    assert full_count.frame_count > 0
    resumed, _ = _train(tmp_path / "resumed", "none", resume=str(tmp_path / "full" / "checkpoint-2"),
                        compile=resumed_count)
    assert resumed_count.frame_count > 0
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_trainer_builds_flora_from_its_class(tmp_path):
    """``optimizer_cls_and_kwargs``, the Trainer's way under FSDP (where it refuses
    ``optimizers=``): Flora is built on the Trainer's own parameter groups with the lr given
    (the scheduler starts from it), compresses the matrices, and trains."""
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, logging_steps=1, save_strategy="no", max_steps=4)
    trainer = Trainer(model=_llama(), args=args, train_dataset=_Tokens(),
                      optimizer_cls_and_kwargs=(flora.Flora, dict(lr=1e-2, rank=4, beta1=0.9)))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(opt, flora.Flora)
    assert [g["initial_lr"] for g in opt.param_groups] == [1e-2] * len(opt.param_groups)
    assert sum("exp_avg_c" in opt.state[p] for g in opt.param_groups for p in g["params"]) == 16
    assert all(opt.state[p]["step"] == 4 for g in opt.param_groups for p in g["params"])


def _fused_trainer(tmp_path, *, fused=True, max_grad_norm=0.0, rank=4, interrupt_at=None, scaler=False):
    model = _llama()
    opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
    acc = flora.CompressedAccumulator(model, rank=rank, tau=2, optimizer=opt, fused=fused, seed=1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             report_to=[], use_cpu=True, max_grad_norm=max_grad_norm, disable_tqdm=True, seed=0,
                             max_steps=3, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(32), optimizers=(opt, None),
                      callbacks=[flora.AccumulatorCallback(acc)])
    if scaler:  # what accelerate builds for fp16=True on a GPU, put where it keeps it
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    forwards = []
    if interrupt_at is not None:
        def stop(module, inputs):
            forwards.append(1)
            if len(forwards) == interrupt_at:
                raise KeyboardInterrupt
        handle = model.register_forward_pre_hook(stop)
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        handle.remove()
        assert acc.micro_step == 1  # the interrupted window's first micro-batch
    trainer.train()  # again, as a notebook retry: the Trainer's model.zero_grad() drops the window
    return model, acc


@pytest.mark.parametrize("rank", [None, 4])
def test_fused_mode_under_the_trainer_retried_after_an_interrupted_window(tmp_path, rank):
    """A train() interrupted mid-window, then train() again on the same objects: normal mode
    sees the Trainer's model.zero_grad() drop the window; fused mode did not, and the retry
    failed with "gradient_accumulation_steps > tau" though they were equal (a probe). The
    callback drops the leftover when training starts: fused equals normal."""
    normal, _ = _fused_trainer(tmp_path / "n", fused=False, rank=rank, interrupt_at=4)
    fused, acc = _fused_trainer(tmp_path / "f", rank=rank, interrupt_at=4)
    assert acc.micro_step == 0
    for a, b in zip(normal.parameters(), fused.parameters()):
        assert torch.equal(a, b)


def test_fused_mode_warns_that_the_trainers_clipping_clips_nothing(tmp_path):
    """In fused mode each parameter steps during backward, before the Trainer clips: its
    max_grad_norm (1.0 by default) clipped nothing, silently, and its grad_norm logged 0 (a
    probe: 2.0e-2 from the Trainer alone after 4 SGD steps). Warned when training starts."""
    import warnings

    with pytest.warns(UserWarning, match=r"max_grad_norm=1\.0\) clips nothing in fused mode"):
        _fused_trainer(tmp_path / "a", max_grad_norm=1.0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _fused_trainer(tmp_path / "b", max_grad_norm=0.0)
    assert not [w for w in said if "clips nothing" in str(w.message)]


def test_the_callbacks_json_carries_every_entry_of_the_accumulators_state():
    """What AccumulatorCallback writes to trainer_state.json reads back as the accumulator's
    state_dict, entry for entry: its 'dims' (each parameter's projected dimension) had been
    dropped, so a resume under another layout (max_aspect_ratio, proj_dim) was not said."""
    from flora.trainer_callback import LIST_KEYS, _from_json, _to_json

    model = _llama()
    acc = flora.CompressedAccumulator(model, rank=2, tau=2, seed=1, max_aspect_ratio=None)
    sd = acc.state_dict()
    assert {k for k, v in sd.items() if isinstance(v, torch.Tensor)} == set(LIST_KEYS)
    back = _from_json(json.loads(json.dumps(_to_json(sd))))
    assert back.keys() == sd.keys()
    for k in LIST_KEYS:
        assert back[k].dtype == torch.int64 and torch.equal(back[k], sd[k]), k
    other = flora.CompressedAccumulator(_llama(), rank=2, tau=2, seed=1, max_aspect_ratio=1.5)
    with pytest.warns(UserWarning, match="another layout"):
        other.load_state_dict(back)
    old = _to_json(sd)
    del old["dims"]  # a checkpoint written before 'dims' was saved still loads
    flora.CompressedAccumulator(_llama(), rank=2, tau=2, seed=1, max_aspect_ratio=None).load_state_dict(
        _from_json(json.loads(json.dumps(old))))


def test_the_callbacks_json_carries_a_mid_cycle_state_exactly():
    """The partial sums too (keyed by parameter index, each in its shape): read back from
    JSON, the next backward and step equal those of the accumulator it was saved from (the
    round trip had been tested with empty sums only, probe Z78)."""
    from flora.trainer_callback import _from_json, _to_json

    def build():
        model = _llama()
        opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
        return model, opt, flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, seed=1)

    ids = [_Tokens()[i]["input_ids"][None] for i in range(2)]
    model, opt, acc = build()
    model(input_ids=ids[0], labels=ids[0]).loss.backward()
    sd = acc.state_dict()
    assert sd["compressed"] and sd["dense"]
    other, other_opt, other_acc = build()
    other_acc.load_state_dict(_from_json(json.loads(json.dumps(_to_json(sd)))))
    for m, o in ((model, opt), (other, other_opt)):
        m(input_ids=ids[1], labels=ids[1]).loss.backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_fused_mode_takes_the_trainers_fp16_scaler(tmp_path):
    """fp16 under the Trainer (a GPU) steps through accelerate's GradScaler; a fused
    accumulator built before the Trainer, as documented, never saw it: each parameter
    stepped on its scaled gradient, then the Trainer's scaler.step failed with "No inf
    checks were recorded" (probe Z29, emulated with a CPU GradScaler). The callback hands
    it over when training starts: fused equals normal mode, which needs nothing."""
    normal, _ = _fused_trainer(tmp_path / "n", fused=False, rank=None, scaler=True)
    fused, acc = _fused_trainer(tmp_path / "f", rank=None, scaler=True)
    assert isinstance(acc.scaler, torch.amp.GradScaler)
    for a, b in zip(normal.parameters(), fused.parameters()):
        assert torch.equal(a, b)



def test_a_second_trainer_on_the_same_fused_accumulator_hands_over_its_own_scaler(tmp_path):
    """Each Trainer's accelerator has a GradScaler of its own: the callback kept the first
    Trainer's, and the second run failed in its scaler.step ("No inf checks were recorded",
    probe Z78). Two runs in turn equal normal mode's, also where the user gave the
    accumulator a scaler of their own (the Trainer steps through its accelerator's)."""
    def two_runs(fused, scaler=None):
        model = _llama()
        opt = flora.Flora(model.parameters(), lr=1e-2, rank=4, beta1=0.9)
        acc = flora.CompressedAccumulator(model, rank=None, tau=2, optimizer=opt, fused=fused, seed=1, scaler=scaler)
        for run in range(2):
            args = TrainingArguments(output_dir=str(tmp_path / f"{fused}{run}"), per_device_train_batch_size=4,
                                     gradient_accumulation_steps=2, report_to=[], use_cpu=True, max_grad_norm=0.0,
                                     disable_tqdm=True, seed=0, max_steps=2, save_strategy="no")
            trainer = Trainer(model=model, args=args, train_dataset=_Tokens(32), optimizers=(opt, None),
                              callbacks=[flora.AccumulatorCallback(acc)])
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** (8 + 4 * run))
            trainer.train()
            assert not fused or acc.scaler is trainer.accelerator.scaler
        return model

    normal = two_runs(False)
    for fused in (two_runs(True), two_runs(True, scaler=torch.amp.GradScaler("cpu"))):
        for a, b in zip(normal.parameters(), fused.parameters()):
            assert torch.equal(a, b)


def _trained_then_plain(tmp_path, fused, max_steps=2, also=()):
    """A Trainer run with the callback (tau 2) on a fresh model, handed over to a plain loop:
    the model, optimizer, accumulator and a function giving the optimizer's step count."""
    model = _llama()
    opt = flora.Flora(model.parameters(), lr=1e-2, scale_parameter=False, rank=8, beta1=0.9)
    acc = flora.CompressedAccumulator(model, rank=4, tau=2, optimizer=opt, fused=fused)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=max_steps,
                             gradient_accumulation_steps=2, max_grad_norm=0, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_Tokens(16), optimizers=(opt, None),
            callbacks=[flora.AccumulatorCallback(acc), *also]).train()
    return model, opt, acc, lambda: max(s["step"] for s in opt.state.values())


@pytest.mark.parametrize("fused", [False, True], ids=["normal", "fused"])
def test_a_plain_loop_after_train_counts_tau_again(tmp_path, fused):
    """After trainer.train() the callback's accumulator had stayed driven by accelerate,
    whose sync flag stays True: every later backward of a plain loop closed a cycle (fused:
    an optimizer step per micro-batch on a gradient divided by tau; normal: nothing
    compressed), and a state saved then carried the mark (probe Z87). Now the loop runs as
    on a fresh accumulator: one cycle, and in fused mode one step, per tau backward passes."""
    model, opt, acc, steps = _trained_then_plain(tmp_path, fused)
    s0, c0, x = steps(), acc.cycle, torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(9))
    (model(input_ids=x, labels=x).loss / 2).backward()
    assert (acc.cycle, acc.micro_step, steps()) == (c0, 1, s0)
    assert acc.state_dict()["driven"] == 0
    (model(input_ids=x, labels=x).loss / 2).backward()
    if not fused:  # the cycle ends at its tau-th backward; the loop steps
        assert (acc.cycle, acc.micro_step, steps()) == (c0 + 1, 0, s0)
        opt.step()
        opt.zero_grad()
    assert (acc.cycle, acc.micro_step, steps()) == (c0 + 1, 0, s0 + 1)


@pytest.mark.parametrize("fused", [False, True], ids=["normal", "fused"])
def test_a_plain_loop_after_a_run_stopped_mid_window_finishes_that_window(tmp_path, fused):
    """Stopped mid-window, the Trainer leaves accelerate's sync flag unsynced; the plain
    loop's first backward was refused as "gradient_accumulation_steps > tau" (a review of
    the fix above). Now the flag is read as a leftover, as by an accumulator built then:
    the open window counts on to tau, and the next window is a whole one."""
    model, opt, acc, steps = _trained_then_plain(tmp_path, fused, max_steps=4, also=[_StopMidWindow()])
    s0, c0, x = steps(), acc.cycle, torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(9))
    assert acc.micro_step == 1
    for window in (1, 2):
        for _ in range(acc.tau - acc.micro_step):
            (model(input_ids=x, labels=x).loss / 2).backward()
        if not fused:
            opt.step()
            opt.zero_grad()
        assert (acc.cycle, acc.micro_step, steps()) == (c0 + window, 0, s0 + window)
