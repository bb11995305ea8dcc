"""Warnings that point at the user's line."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

# Frames in these files are flora's or torch's own: a warning skips them to the caller's line
# (torch's add_param_group, a compiled wrapper and autograd's backward sit between flora and
# the user on some paths, so a fixed stacklevel pointed inside them; a probe).
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
             os.path.abspath(contextlib.__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside flora and torch."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 2)
