"""Parsers of command-line values (argparse ``type=``), shared by every subcommand."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["integer", "number", "share"]


def number(minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    """A parser of finite numbers at least *minimum* (above it, when *strict*)."""

    def parse(text: str) -> float:
        value = float(text)
        if (
            math.isnan(value)
            or math.isinf(value)
            or value < minimum
            or (strict and value == minimum)
        ):
            raise argparse.ArgumentTypeError(
                f"must be a number {'>' if strict else '>='} {minimum:g}, got {text!r}"
            )
        return value

    return parse


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A parser of integers from *minimum* (to *maximum*, if given)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        return value

    return parse


def share(text: str) -> float:
    """A parser of a share, 0.0 to 1.0."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0.0-1.0, got {text!r}")
    return value
