"""Experiment (issue 17): does the byte LMs' gain from momentum_form="exact" come from one kind
of layer? Flora's default form ('floored') on every tensor except one kind, which gets 'exact',
through parameter groups (the library is unchanged). Rows: 'attn' (q, k, v, o projections),
'mlp' (gate, up, down), 'embed' (embeddings and output head), 'qk', 'vo', 'all' (every tensor: the 'exact' row),
'none' (the default row). 'KIND*F': the default form with lr x F on that kind; 'T:KIND*F', 'F:KIND*F': Adafactor
beta1=0.9 (the target), beta1=None (the floor) so.
On the suite's MLPs (tabular, tabstream: nn.Sequential 40-256-256-8) the kinds are the layers
'first', 'middle', 'last' (modules 0, 2, 4).
argv: out.jsonl task scale rank rows lrs [first-last seed, default 0-2]
With PHIREC=TAG set, phirec.py (beside this file) records the 'scaled' weight that the default
form floors at 0.4, and appends its quantiles over the last 40% of steps to $PHIREC_OUT; with
RHOREC=TAG, rhorec.py records the agreement of each step with the momentum in the subspace."""
import json, os, sys

if os.environ.get("PHIREC"):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import phirec
    phirec.install(os.environ["PHIREC"])
if os.environ.get("RHOREC"):  # rhorec.py: the agreement of the step with the momentum, in the subspace
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import rhorec
    rhorec.install(os.environ["RHOREC"])

from flora.bench import optimizers
from flora.bench.suite import runner, space

KINDS = {  # 'attn': a module in the path named like attention (on Llama: q, k, v, o projections)
         "mlp": ("gate_proj", "up_proj", "down_proj", "mlp", "fc", "net."),
         "embed": ("embed", "lm_head", "wte", "head"),
         "qk": ("q_proj", "k_proj"), "vo": ("v_proj", "o_proj")}


def is_attention_name(name):
    return any("attn" in part or "attention" in part for part in name.lower().split(".")[:-1])


LAYERS = {"first": "0.", "middle": "2.", "last": "4."}  # the MLPs' Linear layers


def grouped(model, kind):
    if kind in LAYERS:
        hit = [n.startswith(LAYERS[kind]) for n, _ in model.named_parameters()]
        params = list(model.named_parameters())
        return [x for x, h in zip(params, hit) if h], [x for x, h in zip(params, hit) if not h]
    names = KINDS.get(kind, ())
    picked, rest = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            hit = is_attention_name(n) if kind == "attn" else kind == "all" or any(s in n for s in names)
            (picked if hit else rest).append((n, p))
    return picked, rest


out_path, task, scale, rank = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rows, lrs = sys.argv[5].split(","), [float(x) for x in sys.argv[6].split(",")]
first, last = (int(x) for x in (sys.argv[7] if len(sys.argv) > 7 else "0-2").split("-"))
runner._init("runs/suite-data", "cpu", scale, 1)
done = set()
try:
    for line in open(out_path):
        r = json.loads(line)
        done.add((r["task"], r["row"], r["rank"], r["lr"], r["seed"], r["scale"]))
except FileNotFoundError:
    pass
original = runner._optimizer
with open(out_path, "a") as out:
    for row in rows:
        # T: Adafactor beta1=0.9 (the target), F: beta1=None (the floor), else Flora r{rank}
        baseline = {"T": "adafactor-b0.9", "F": "adafactor"}.get(row[:2].rstrip(":")) if row[1:2] == ":" else None
        spec = row[2:] if baseline else row
        kind, _, factor = spec.partition("*")  # kind*f: the default form, lr x f on that kind

        def _optimizer(name, model, lr, *, kappa, seed, workload=None, kind=kind, factor=factor):
            picked, rest = grouped(model, kind)
            print(row, "on", [n for n, _ in picked if _.dim() >= 2][:12], flush=True) if seed == first else None
            own = {"lr": lr * float(factor)} if factor else {"momentum_form": "exact"}
            groups = ([{"params": [p for _, p in rest]}] if rest else []) + \
                     ([{"params": [p for _, p in picked], **own}] if picked else [])
            return optimizers.make_optimizer(optimizers.parse(name), groups, lr, kappa=kappa, seed=seed)
        runner._optimizer = _optimizer
        for seed in range(first, last + 1):
            for lr in lrs:
                if (task, row, rank, lr, seed, scale) in done:
                    continue
                r = runner.run_job(space.Job(task, baseline or f"flora-r{rank}", lr, seed))
                r.update(row=row, rank=rank, scale=scale)
                out.write(json.dumps(r) + "\n"); out.flush()
