"""Seeds no test chose: drawn afresh on every run, so a property checked on them holds for inputs nobody picked to
pass. A failing case's id carries its seed; `QWEN_LORA_TEST_SEED=<seed>` replays the run that drew it."""

from __future__ import annotations

import os
import secrets

import pytest

SEED_ENV = "QWEN_LORA_TEST_SEED"


def draw_run_seed() -> None:
    """Called once per run before the tests are collected (conftest's `pytest_configure`): the parallel workers
    inherit it, so each collects the same ids."""
    os.environ.setdefault(SEED_ENV, str(secrets.randbits(31)))


def _first() -> int:
    return int(os.environ.get(SEED_ENV) or secrets.randbits(31))


def unchosen_seeds(count: int) -> list:
    """`count` parameters for `@pytest.mark.parametrize("seed", ...)`, consecutive from this run's fresh seed."""
    first = _first()
    return [pytest.param(first + i, id=f"unchosen-{first + i}") for i in range(count)]
