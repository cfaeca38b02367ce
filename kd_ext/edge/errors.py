"""Errors of the edge runtime, with messages meant for the person running it."""


class EdgeError(Exception):
    """Base class of the edge runtime's errors."""


class EdgeModelError(EdgeError):
    """The IR is missing, incomplete, corrupt, or not an anomaly model."""


class EdgeInputError(EdgeError):
    """The images or the output folder cannot be used."""
