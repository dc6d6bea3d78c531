"""The warning class every part of sloth_core warns with (a leaf: importing it pulls in nothing)."""


class SlothCoreWarning(UserWarning):
    """Warnings from sloth_core (nothing matched, already optimized, a fallback, lost coverage, ...)."""
