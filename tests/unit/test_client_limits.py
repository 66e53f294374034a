"""The client's size check counts exactly what the coordinator counts: the Fernet token."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from coordinator_agent.client import fernet_token_bytes
from coordinator_agent.exceptions import CoordinatorError, WaitTimeout


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 32, 33, 1000, 4095, 4096, 262_000])
def test_token_length_formula_matches_fernet(size: int) -> None:
    assert fernet_token_bytes(size) == len(Fernet(Fernet.generate_key()).encrypt(b"x" * size))


def test_wait_timeout_is_ours_and_still_a_timeout_error() -> None:
    error = WaitTimeout("abc123", 2.5)
    assert isinstance(error, CoordinatorError) and isinstance(error, TimeoutError)
    assert error.task_id == "abc123"
    assert str(error) == "no result for task abc123 within 2.5s (the task goes on)"
