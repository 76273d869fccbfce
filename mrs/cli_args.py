"""Argument checks the CLI's commands share (mrs/cli.py, mrs/cli_train.py): Fire hands a
command whatever type a flag's text parses as, so each value is checked and converted here
with an error that names the flag."""

from __future__ import annotations

from typing import Any

from mrs.errors import MrsError


class UsageError(MrsError):
    """A command-line argument is wrong."""


def _text(value: Any, name: str) -> str:
    # Fire turns "123" into an int and "a,b" into a tuple; a prompt is always text.
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if value is None or isinstance(value, bool):
        raise UsageError(f"{name} must be text")
    return str(value)


def _int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise UsageError(f"{name} must be {bounds}, got {number}")
    return number


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _number(value: Any, name: str, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    if low is not None and value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")
    return float(value)
