"""Typed errors. Every user-facing failure is one of these: the CLI prints its message on one line and exits 2."""


class PowerInferError(Exception):
    """Base class: a problem with the user's input, described in one line."""


class ModelFormatError(PowerInferError):
    """A model file or folder is missing, unreadable, truncated or inconsistent."""


class UnsupportedModelError(PowerInferError):
    """The model is readable but uses an architecture or feature this engine does not run."""


class InputError(PowerInferError):
    """A bad argument: prompt too long, unknown unit, mismatched files, output exists without --force."""


class BudgetError(PowerInferError):
    """The VRAM budget cannot hold what must live on the GPU."""
