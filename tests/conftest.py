"""Shared fixtures: the read-only data folder beside the project and small real slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``; tests use real data and fail loudly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing; clone the project beside shared/")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
