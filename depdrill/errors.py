"""The errors a user can cause or meet, each with the exit code the CLI gives it."""

from __future__ import annotations


class DepdrillError(Exception):
    """Base of every error that reaches the user as one clear line."""

    exit_code = 2


class InputError(DepdrillError):
    """Bad input: a missing, unreadable or malformed file, a bad option value."""

    exit_code = 2


class TargetError(DepdrillError):
    """The target cannot be reached: no such namespace or pid, a probe that never answers."""

    exit_code = 2


class CapabilityError(DepdrillError):
    """A missing capability or privilege on this machine (see `depdrill doctor`)."""

    exit_code = 3
