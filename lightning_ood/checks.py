"""Argument checks shared by models and datamodules (pure Python), one error wording."""

from __future__ import annotations


def check_at_least(minimum: int, **values: int) -> None:
    """Raise ``ValueError`` naming the first argument below ``minimum``."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
