"""The library's one family of exceptions.

Every error carries the thing at fault (a file, a key, a shape or a value) in its message, so the
CLI can print it without a traceback and exit non-zero.
"""

from __future__ import annotations


class ReparamError(Exception):
    """Base class of every error this library raises on purpose."""


class FusionError(ReparamError, ValueError):
    """Branches that cannot be fused into one convolution (alignment, shapes, BN variance)."""


class SpecError(ReparamError, ValueError):
    """A block or model description (or spec) that is not valid."""


class ShapeMismatchError(ReparamError, ValueError):
    """A tensor whose shape differs from what the architecture needs."""


class UnknownModelError(ReparamError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(ReparamError, ValueError):
    """A checkpoint that cannot be read or does not match the architecture."""


class UnsafeFileError(CheckpointError):
    """A file that asks to run code or import objects when it is loaded."""


class ArgumentError(ReparamError, ValueError):
    """A parameter value that is not allowed (a count below 1, an unknown choice) outside any
    spec or file."""


class VerificationError(ReparamError):
    """A check that ran and failed: two outputs that should agree do not (the CLI exits 1 for
    it; every other ReparamError is bad input and exits 2)."""


class BackendUnavailableError(ReparamError, RuntimeError):
    """A framework (or its environment) that is not installed here."""
