"""Diagnostic (issue 17, thirty-fourth session): record, per compressed matrix and step, the
agreement of this step's compressed update with the momentum before it,
rho = <C(u_t), M_{t-1}> / (|C(u_t)| |M_{t-1}|) (the step already computes the three sums:
flora.momentum.compressed_terms), and append its mean, median and 10% / 90% quantiles over the
first 20% and the last 40% of the run's calls to $RHOREC_OUT (a JSON line). Positive: the
gradient keeps its direction in the subspace; negative: the subspace overshoots (the sign
that hypergradient-style lr adaptation reads)."""
import atexit
import json
import os
import statistics

import torch

import flora.functional as ff
import flora.momentum as fm

RECORD = []
_terms = fm.compressed_terms


def _recorded(c, cu, a, dim, *, isometric, dtype):
    t = _terms(c, cu, a, dim, isometric=isometric, dtype=dtype)
    if isometric:  # (cross, |M|^2, |C(u)|^2) per matrix
        x = t.reshape(-1, t.shape[-1]).double()
        rho = x[:, 0] / (x[:, 1] * x[:, 2]).sqrt()
        RECORD.append([float(v) for v in rho if torch.isfinite(v)])  # the first step has M = 0
    return t


def install(tag: str) -> None:
    fm.compressed_terms = ff.compressed_terms = _recorded  # both call sites look it up in their module

    def dump():
        n = len(RECORD)
        out = dict(tag=tag, calls=n)
        for name, part in (("early", RECORD[: n // 5]), ("late", RECORD[int(n * 0.6):])):
            vals = sorted(v for call in part for v in call)
            if vals:
                out[name] = dict(mean=round(statistics.fmean(vals), 4), median=round(statistics.median(vals), 4),
                                 q10=round(vals[len(vals) // 10], 4), q90=round(vals[9 * len(vals) // 10], 4))
        with open(os.environ.get("RHOREC_OUT", "rho.jsonl"), "a") as f:
            f.write(json.dumps(out) + "\n")
    atexit.register(dump)
