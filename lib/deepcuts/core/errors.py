"""The failures a scheduler tells apart, by exit code (documented in the README).

``ConfigError`` (exit 2) lives in :mod:`deepcuts.core.config`; a stage raises these two for
the other outcomes that are not bugs.  Anything else a stage raises is exit 1.
"""
from __future__ import annotations


class InputMissing(FileNotFoundError):
    """A stage's input is missing or empty (exit 3): nothing was published."""


class GateFailed(RuntimeError):
    """A quality gate failed (exit 4): the run finished what it safely could, and says which gate."""


# How a failed stage's manifest row (``runs.error``) begins when a gate stopped it: the report
# counts these rows as failed gates, as the CLI's exit code 4 does.
GATE_OUTCOME = "quality gate failed"
