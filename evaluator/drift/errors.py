"""Why drift cannot be computed as asked: typed, so the command maps each to its exit status."""

from __future__ import annotations

from collections.abc import Sequence


class DriftError(Exception):
    """Drift cannot be computed as asked; the message says why and what to do."""


class BadReferenceError(DriftError):
    """The reference cannot be compared with the live window."""


class ReferenceFormatError(BadReferenceError):
    """The reference file is unreadable, of an unknown format, or malformed (line named)."""


class EmptyReferenceError(BadReferenceError):
    """The reference has no rows (or no usable values)."""


class MissingFeaturesError(BadReferenceError):
    """The live window has features the reference lacks."""

    def __init__(self, message: str, missing: Sequence[str]) -> None:
        super().__init__(message)
        self.missing = list(missing)


class FeatureTypeError(BadReferenceError):
    """A feature's type differs between reference and live (or within the reference)."""

    def __init__(self, message: str, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


class EmptyWindowError(DriftError):
    """The live window holds no predictions for the route."""
