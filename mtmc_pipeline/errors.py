"""Errors a user can fix (a device that is not there, weights that cannot be read).

They live apart from the modules that raise them so the Dagster layer can name them without
importing torch and timm: the code location then loads in a second instead of several.
"""


class DeviceError(ValueError):
    """The requested device or precision is not available on this machine."""


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights were asked for but could not be fetched or read."""
