"""Range checks for methods' option dataclasses. Each raises :class:`OptionError` naming the option; the
configuration turns it into one line naming ``method.<option>``."""

from __future__ import annotations

from frugalseg.errors import OptionError

__all__ = ["OptionError", "check_choice", "check_fraction", "check_momentum", "check_non_negative", "check_positive"]


def check_momentum(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise OptionError(name, f"must be in [0, 1), got {value}")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise OptionError(name, f"must be in [0, 1], got {value}")


def check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise OptionError(name, f"must be 0 or positive, got {value}")


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise OptionError(name, f"must be positive, got {value}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(name, f"must be one of {', '.join(choices)}, got {value!r}")
