"""The Flora optimizer: Adafactor whose first moment is kept in a randomly projected,
low-rank form and moved to a fresh projection every ``kappa`` steps."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from . import adafactor as af
from ._validation import check_choice, check_nonneg_int, check_positive_int, check_real
from .momentum import MOMENTUM_FORMS, compressed_step_, dense_momentum_, resample_
from .projection import (
    choose_dim,
    compressed_shape,
    gaussian_projection,
    matrix_shape,
    projection_seed,
)

PROJ_DIMS = ("auto", 0, 1)


def momentum_plan(shape, group: dict) -> int | None:
    """The projected dimension of a parameter's first moment, or None for dense.

    Tensors of two or more dims are viewed as ``(shape[0], rest)``; they are compressed
    when the projected dimension exceeds the rank and the aspect ratio is allowed."""
    rank = group["rank"]
    if rank is None or len(shape) < 2:
        return None
    n, m = matrix_shape(shape)
    ratio = group["max_aspect_ratio"]
    if ratio is not None and max(n, m) > ratio * min(n, m):
        return None
    dim = choose_dim(shape, group["proj_dim"])
    return dim if (n, m)[dim] > rank else None


def _validate_group(group: dict) -> None:
    lr, rel = group["lr"], group["relative_step"]
    check_real("lr", lr, low=0.0, allow_none=True)
    if not isinstance(rel, bool):
        raise TypeError(f"relative_step must be True or False, got {rel!r}")
    if lr is not None and rel:
        raise ValueError("lr must be None when relative_step=True (the step size is then relative); "
                         "pass relative_step=False to use a fixed lr")
    if lr is None and not rel:
        raise ValueError("lr must be a non-negative number when relative_step=False")
    if group["warmup_init"] and not rel:
        raise ValueError("warmup_init=True requires relative_step=True")
    check_positive_int("rank", group["rank"], allow_none=True)
    check_positive_int("kappa", group["kappa"])
    check_real("beta1", group["beta1"], low=0.0, high=1.0, high_open=True, allow_none=True)
    eps = group["eps"]
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise TypeError(f"eps must be a pair (eps1, eps2) of non-negative numbers, got {eps!r}")
    check_real("eps[0]", eps[0], low=0.0)
    check_real("eps[1]", eps[1], low=0.0)
    check_real("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
    check_real("decay_rate", group["decay_rate"], high=0.0, high_open=True)
    check_real("weight_decay", group["weight_decay"], low=0.0)
    check_nonneg_int("seed", group["seed"])
    check_choice("proj_dim", group["proj_dim"], PROJ_DIMS)
    check_choice("momentum", group["momentum"], MOMENTUM_FORMS)
    check_real("max_aspect_ratio", group["max_aspect_ratio"], low=1.0, allow_none=True)
    for name in ("scale_parameter", "warmup_init", "cache_projections"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{name} must be True or False, got {group[name]!r}")


class Flora(Optimizer):
    r"""Adafactor with Flora's compressed, resampled first moment.

    With ``rank=None`` (or ``beta1=None``) this is ``transformers.optimization.Adafactor``
    with the same arguments. With a rank, each parameter of two or more dims whose
    projected dimension exceeds ``rank`` keeps its momentum as an ``r x m`` or ``n x r``
    matrix ``M`` under a Gaussian projection ``A`` (N(0, 1/r) entries, regenerated from a
    seed, never stored). Every ``kappa`` steps a new projection is drawn and ``M`` is
    carried over (``M <- M A_old A_new^T``).

    Args:
        params: parameters or parameter groups; every option below can be set per group.
        lr: fixed learning rate; leave None to use Adafactor's relative step.
        rank: rank of the compressed momentum; None keeps it dense (plain Adafactor).
        kappa: steps between resamplings of the projection.
        beta1: momentum coefficient in [0, 1), or None for no first moment.
        eps, clip_threshold, decay_rate, weight_decay, scale_parameter, relative_step,
        warmup_init: as in ``transformers.optimization.Adafactor``. ``relative_step``
            defaults to ``lr is None``.
        seed: base seed of all projections; a parameter's projection number ``k`` is
            drawn from ``projection_seed(seed, index, k)``, ``index`` being its position
            across the parameter groups.
        proj_dim: dimension projected away: ``"auto"`` (the smaller, less noisy), 0 or 1.
        momentum: ``"exact"`` (this step enters uncompressed:
            ``(1 - beta1) u + beta1 M_prev A``) or ``"paper"`` (the update is ``M A``).
        max_aspect_ratio: leave tensors with ``max(n, m) / min(n, m)`` above this dense;
            None compresses every shape (embeddings included).
        cache_projections: keep each parameter's current projection on its device until
            the next resample instead of redrawing it every step: faster on GPUs, where
            drawing on the CPU generator is up to a third of the step, for extra memory
            of ``r * min(n, m)`` per compressed tensor (at most its momentum's size). The
            cache is not part of the state and changes no result.

    State is float32 whatever the parameter dtype. A compressed update is clipped to RMS
    ``lr * clip_threshold`` after decompression, the bound that dense momentum obeys by
    construction; the decompression would otherwise amplify it by about sqrt(d / r).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        *,
        rank: int | None = None,
        kappa: int = 1000,
        beta1: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool | None = None,
        warmup_init: bool = False,
        seed: int = 0,
        proj_dim: str | int = "auto",
        momentum: str = "exact",
        max_aspect_ratio: float | None = None,
        cache_projections: bool = False,
    ):
        if relative_step is None:
            relative_step = lr is None
        defaults = dict(
            lr=lr, rank=rank, kappa=kappa, beta1=beta1, eps=tuple(eps) if isinstance(eps, list) else eps,
            clip_threshold=clip_threshold, decay_rate=decay_rate, weight_decay=weight_decay,
            scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=warmup_init,
            seed=seed, proj_dim=proj_dim, momentum=momentum, max_aspect_ratio=max_aspect_ratio,
            cache_projections=cache_projections,
        )
        _validate_group(defaults)
        super().__init__(params, defaults)
        # parameter index -> ((seed, rank, count), projection); see cache_projections
        self._proj_cache: dict[int, tuple[tuple, torch.Tensor]] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        if "lr" in param_group and "relative_step" not in param_group and param_group["lr"] is not None:
            merged["relative_step"] = False
        _validate_group(merged)
        for p in (param_group["params"] if not isinstance(param_group["params"], torch.Tensor)
                  else [param_group["params"]]):
            if isinstance(p, torch.Tensor) and p.is_complex():
                raise TypeError("params must be real tensors: Flora does not support complex parameters")
        super().add_param_group({**param_group, "relative_step": merged["relative_step"]})

    # ------------------------------------------------------------------ stepping

    def _check_grads(self) -> None:
        for group in self.param_groups:
            _validate_group(group)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise TypeError("Flora does not support sparse gradients (got one of shape "
                                    f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)")
                if g.is_complex():
                    raise TypeError("Flora does not support complex gradients")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every check happens before any state changes.
        self._check_grads()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group, self.state[p], index)
                index += 1
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor) -> None:
        """Step one parameter with its current ``.grad``, exactly as ``step()`` would.

        For optimizer-in-backward use (fused accumulation): parameters can be stepped one
        by one as their gradients arrive, and the result equals one ``step()``."""
        index = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    if p.grad is None:
                        return
                    if p.grad.is_sparse or p.grad.is_complex():
                        self._check_grads()
                    self._step_param(p, group, self.state[p], index)
                    return
                index += 1
        raise ValueError("step_parameter: the tensor is not a parameter of this optimizer")

    def _init_state(self, state: dict, grad: torch.Tensor, group: dict) -> None:
        shape = grad.shape
        state["step"] = 0
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=grad.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=grad.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=grad.device)

    def _init_momentum(self, state: dict, grad: torch.Tensor, group: dict) -> None:
        dim = momentum_plan(grad.shape, group)
        if dim is None:
            state["exp_avg"] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        else:
            state["exp_avg_c"] = torch.zeros(
                compressed_shape(grad.shape, group["rank"], dim), dtype=torch.float32, device=grad.device
            )
            state["proj_dim"] = dim
            state["proj_count"] = 0  # projections drawn so far, minus one
            state["proj_age"] = 0  # steps taken with the current projection

    def _projection(self, group: dict, state: dict, index: int, count: int, shape, device) -> torch.Tensor:
        key = (group["seed"], group["rank"], count)
        hit = self._proj_cache.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
        a = gaussian_projection(
            projection_seed(group["seed"], index, count), group["rank"], matrix_shape(shape)[state["proj_dim"]],
            device=device,
        )
        if group["cache_projections"]:
            self._proj_cache[index] = (key, a)
        else:
            self._proj_cache.pop(index, None)
        return a

    def _step_param(self, p: torch.Tensor, group: dict, state: dict, index: int) -> None:
        grad = p.grad
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        if not state:
            self._init_state(state, grad, group)
        beta1 = group["beta1"]
        if beta1 is not None and "exp_avg" not in state and "exp_avg_c" not in state:
            self._init_momentum(state, grad, group)

        p32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state["step"] += 1
        t = state["step"]
        eps1, eps2 = group["eps"]
        lr = af.step_size(
            group["lr"], t, af.rms(p32), eps2=eps2, relative_step=group["relative_step"],
            warmup_init=group["warmup_init"], scale_parameter=group["scale_parameter"],
        )
        beta2t = af.second_moment_decay(t, group["decay_rate"])
        if grad.dim() >= 2:
            update = af.factored_normalize_(grad, state["exp_avg_sq_row"], state["exp_avg_sq_col"], beta2t, eps1)
        else:
            update = af.unfactored_normalize_(grad, state["exp_avg_sq"], beta2t, eps1)
        if beta1 is not None and "exp_avg_c" in state:
            update = self._compressed_update(group, state, index, update, beta1, lr)  # clips, scales by lr
        else:
            af.clip_by_rms_(update, group["clip_threshold"])
            update.mul_(lr)
            if beta1 is not None:
                update = dense_momentum_(state["exp_avg"], update, beta1)

        if group["weight_decay"] != 0:
            p32.add_(p32, alpha=(-group["weight_decay"] * lr))
        p32.sub_(update)  # == add_(-update) bit for bit, without the negated copy
        if p32 is not p:
            p.copy_(p32)

    def _compressed_update(self, group, state, index, update, beta1, lr) -> torch.Tensor:
        """``update``: the normalised update before Adafactor's clip and lr; overwritten."""
        c, dim = state["exp_avg_c"], state["proj_dim"]
        a = self._projection(group, state, index, state["proj_count"], update.shape, update.device)
        if state["proj_age"] >= group["kappa"]:
            state["proj_count"] += 1
            state["proj_age"] = 0
            a_new = self._projection(group, state, index, state["proj_count"], update.shape, update.device)
            resample_(c, a, a_new, dim)
            a = a_new
        state["proj_age"] += 1
        return compressed_step_(group["momentum"], c, update, a, dim, beta1, lr, group["clip_threshold"])

    # ------------------------------------------------------------ checkpointing

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load after checking that every saved state tensor fits this optimizer's
        parameters; keeps the saved dtype (float32), which torch would otherwise cast to
        the parameter's."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups) if isinstance(groups, list) else 'no'} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        id_to_param: dict[Any, tuple[torch.Tensor, dict]] = {}
        for saved, mine in zip(groups, self.param_groups):
            if len(saved["params"]) != len(mine["params"]):
                raise ValueError(
                    f"state_dict has a parameter group of {len(saved['params'])} parameters where this "
                    f"optimizer has {len(mine['params'])}: it was saved from a different model"
                )
            _validate_group({**self.defaults, **{k: v for k, v in saved.items() if k != "params"}})
            for pid, p in zip(saved["params"], mine["params"]):
                id_to_param[pid] = (p, saved)
        for pid, s in state_dict["state"].items():
            p, g = id_to_param[pid]
            _check_state_shapes(p, s, g)
        super().load_state_dict(state_dict)
        self._proj_cache.clear()
        for group in self.param_groups:  # options added since the state was saved
            for k, v in self.defaults.items():
                group.setdefault(k, v)
        for pid, s in state_dict["state"].items():
            p, _ = id_to_param[pid]
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.detach().to(device=p.device, copy=True)


def _check_state_shapes(p: torch.Tensor, s: dict, group: dict) -> None:
    shape = tuple(p.shape)
    expected = {"exp_avg": shape, "exp_avg_sq": shape}
    if len(shape) >= 2:
        expected["exp_avg_sq_row"] = shape[:-1]
        expected["exp_avg_sq_col"] = shape[:-2] + shape[-1:]
    if "exp_avg_c" in s:
        dim = s.get("proj_dim")
        if dim not in (0, 1) or len(shape) < 2:
            raise ValueError(f"state_dict holds compressed momentum for a parameter of shape {shape} "
                             f"with proj_dim={dim!r}: it was saved from a different model")
        expected["exp_avg_c"] = compressed_shape(shape, group["rank"], dim)
    for k, want in expected.items():
        if k in s and tuple(s[k].shape) != tuple(want):
            raise ValueError(
                f"state_dict entry {k!r} has shape {tuple(s[k].shape)} but this optimizer's parameter of shape "
                f"{shape} needs {tuple(want)}: it was saved from a different model or rank"
            )
