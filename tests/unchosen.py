"""Seeds no test chose: drawn afresh on every run, so a property checked on them holds for inputs nobody picked to
pass. A failing case's id carries its seed; `QWEN_LORA_TEST_SEED=<seed>` replays the run that drew it."""

from __future__ import annotations

import os
import secrets

import pytest

_FIRST = int(os.environ.get("QWEN_LORA_TEST_SEED") or secrets.randbits(31))


def unchosen_seeds(count: int) -> list:
    """`count` parameters for `@pytest.mark.parametrize("seed", ...)`, consecutive from this run's fresh seed."""
    return [pytest.param(_FIRST + i, id=f"unchosen-{_FIRST + i}") for i in range(count)]
