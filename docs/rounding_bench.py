"""Where the compiled stochastic rounding's time goes on a CPU (docs/compile.md, fifteenth
and forty-eighth sessions): ``flora.rounding.stochastic_bfloat16`` compiled with inductor,
against its earlier forms (the truncated float32 converted to bfloat16; before that with
``torch.isnan``), its parts alone, and a plain ``.to(bfloat16)``.
One thread, 256 x 800 float32 values, interleaved; the minimum over 40 rounds of 20 calls.

    python docs/rounding_bench.py
"""
import time

import torch

from flora import rounding as R

torch.set_num_threads(1)
_LOW = R._MASK_LOW


def library(x, t):
    return R.stochastic_bfloat16(x, t)


def via_float(x, t):  # the library's form until the forty-eighth session
    bits = x.view(torch.int32)
    noise = R.noise_table(x.device)[((bits >> 16) & 0xFFFF) ^ R.step_key(t)]
    out = ((bits + noise) & _LOW).view(torch.float32)
    return torch.where(x != x, x, out).to(torch.bfloat16)


def with_isnan(x, t):  # the library's form until the fifteenth session
    bits = x.view(torch.int32)
    noise = R.noise_table(x.device)[((bits >> 16) & 0xFFFF) ^ R.step_key(t)]
    out = ((bits + noise) & _LOW).view(torch.float32)
    return torch.where(torch.isnan(x), x, out).to(torch.bfloat16)


def bitcasts_only(x, t):  # float32 -> int32 -> float32, no noise
    return (x.view(torch.int32) & _LOW).view(torch.float32).to(torch.bfloat16)


def to_nearest(x, t):
    return x.to(torch.bfloat16)


def main():
    x = torch.randn(256, 800, generator=torch.Generator().manual_seed(0))
    x[0, :3] = float("nan")
    t = torch.tensor([7.0])
    fns = {f.__name__: torch.compile(f, fullgraph=True, dynamic=False)
           for f in (library, via_float, with_isnan, bitcasts_only, to_nearest)}
    ref = fns["with_isnan"](x, t)
    nan = ref.isnan()
    for name in ("library", "via_float"):  # the same bits (a NaN may come out as another NaN)
        got = fns[name](x, t)
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))
    times = {name: [] for name in fns}
    for _ in range(40):
        for name, f in fns.items():
            s = time.perf_counter()
            for _ in range(20):
                f(x, t)
            times[name].append((time.perf_counter() - s) / 20)
    for name, ts in times.items():
        print(f"{name:14s} {min(ts) * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
