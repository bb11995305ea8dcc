"""bytelm at 2x (800 steps): the default form at rank 8 against `momentum_form="exact"` (the
README's advice for language models at a low rank), beside the floor and the target; each
row at its best lr by mean validation loss (seed 0 for the grid, seeds 1-2 at the best),
test loss over seeds 0-2 and paired differences. Reads runs_bytelm2x.jsonl beside this file
(sixteenth session); prints a Markdown table. Run from anywhere."""
import collections
import json
import statistics as st
from pathlib import Path

NAMES = {"adafactor": "floor (Adafactor beta1=None)", "adafactor-b0.9": "target (beta1=0.9)",
         "flora-r8": "Flora r8, default (`floored`)", "flora-r8-exact-orthonormal": "Flora r8, `exact`",
         "flora-r32": "Flora r32, default (`floored`)"}
runs = collections.defaultdict(lambda: collections.defaultdict(dict))  # optimizer -> lr -> seed -> run
for line in open(Path(__file__).parent / "runs_bytelm2x.jsonl"):
    r = json.loads(line)
    runs[r["optimizer"]][r["lr"]][r["seed"]] = r

best = {}
for opt, grid in runs.items():
    full = {lr: s for lr, s in grid.items() if set(s) >= {0, 1, 2}}
    lr = min(full, key=lambda lr: st.mean(r["val_loss"] for r in full[lr].values()))
    best[opt] = (lr, sorted(grid), [full[lr][s]["test_loss"] for s in (0, 1, 2)])


def paired(a, b):
    d = [x - y for x, y in zip(best[a][2], best[b][2])]
    return f"{st.mean(d):+.4f} ± {st.stdev(d):.4f}"


print("| row | lr (grid) | test loss | - floor | - target | - default r8 |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for opt, name in NAMES.items():
    lr, grid, tl = best[opt]
    cells = [paired(opt, o) if o != opt else "" for o in ("adafactor", "adafactor-b0.9", "flora-r8")]
    print(f"| {name} | {lr:g} ({', '.join(f'{x:g}' for x in grid)}) | {st.mean(tl):.4f} ± {st.stdev(tl):.4f} | "
          + " | ".join(cells) + " |")
