"""User-facing errors.

Every problem a user can cause (a wrong file, a missing component, a bad size) is raised as an
:class:`SD35Error` whose message names the problem and the fix. The CLI prints the message alone and
exits with code 2; it never shows a traceback for these.
"""

from __future__ import annotations


class SD35Error(Exception):
    """A problem with the user's input, explained in one message that says how to fix it."""


class CheckpointError(SD35Error):
    """A weight file that cannot be read, is not SD3-family, or does not fit the model."""


class MissingComponentError(SD35Error):
    """A pipeline part (MMDiT, VAE, a text encoder) that none of the given files provides."""


class SD35Warning(UserWarning):
    """Something the user should know (a truncated prompt, a missing optional part); the run goes on."""
