"""Flora's optimizer names: the one piece that both ``config`` (whose presets name Flora
forms) and ``optimizers`` (which parses names) need, kept below both."""

from __future__ import annotations

import flora

__all__ = ["DEFAULT_FLORA_FORM", "flora_name"]


# Flora's own default (momentum form, projection): what a bare ``flora-rR`` runs.
DEFAULT_FLORA_FORM = (flora.Flora.__init__.__kwdefaults__["momentum_form"],
                      flora.Flora.__init__.__kwdefaults__["projection"])


def flora_name(rank: int, form: str | None = None, projection: str = "gaussian",
               complement_weight: float | None = None) -> str:
    """The shortest name of Flora at ``rank`` with ``form`` and ``projection`` (no form:
    Flora's default, the bare ``flora-rR``); a ``complement_weight`` (the ``"fixed"`` and
    ``"floored"`` forms') follows the form's name: ``flora-r8-fixed0.25-orthonormal``."""
    if complement_weight is None and (form is None or (form, projection) == DEFAULT_FLORA_FORM):
        return f"flora-r{rank}"
    weight = "" if complement_weight is None else f"{float(complement_weight):g}"
    return f"flora-r{rank}-{form}{weight}" + ("" if projection == "gaussian" else f"-{projection}")
