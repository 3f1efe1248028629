"""Errors that carry their fix. The CLI prints `error: <message>` and `hint: <hint>`, then exits with the class's code."""

from __future__ import annotations


def _one_line(text: str) -> str:
    """Library messages (pickle, OS, HTTP) may span lines; ours are always one."""
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


class HubexportError(Exception):
    """A user-facing failure: a one-line message naming the file or value, and a hint saying how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        message = _one_line(message)
        super().__init__(message)
        self.message = message
        self.hint = _one_line(hint) if hint else hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class CheckpointError(HubexportError):
    """The checkpoint is missing, incomplete, corrupt or of an unknown layout."""


class ConfigError(HubexportError):
    """The model config is missing or contradicts the weights or the flags."""


class TargetError(HubexportError):
    """The output path cannot be written as asked."""


class MappingError(HubexportError):
    """Checkpoint tensors and the architecture's expected tensors do not match."""


class HubError(HubexportError):
    """The Hub refused a request (auth, permissions, conflicts)."""


class CardError(HubexportError):
    """The model card or a summary cannot be made: bad metadata, a missing or broken template, unreadable inputs."""


class UnpublishableModel(HubexportError):
    """The publish gate refused the model: identical to its base, or NaN/Inf in its weights."""


class MetricsError(HubexportError):
    """A training-metrics file is unreadable, or a --select asks for a metric or step it does not have."""


class DifferencesFound(HubexportError):
    """`verify` found differences: not a crash, so a distinct exit code."""

    exit_code = 1


class ResolveError(HubexportError):
    """A model reference (a folder or a Hub id) cannot be resolved: not found, no access, not cached offline."""
