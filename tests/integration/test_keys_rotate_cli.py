"""`metering keys rotate` when some stored key cannot be decrypted with the configured keys (the one that encrypted
it was removed too early), through the real CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest

from metering.crypto import generate_key
from tests.integration.test_cli import cli_env, metering, one_error_line

pytestmark = pytest.mark.slow
__all__ = ["cli_env"]  # a fixture
KEY_1, KEY_2 = "sk-own-key-of-user-one-0123456789-1111", "sk-own-key-of-user-two-0123456789-2222"


def _set(env: dict[str, str], user: str, api_key: str, keys: str) -> None:
    args = ["byollm", "set", "-u", user, "-t", "acme", "--provider", "openai", "--model", "gpt-4o-mini"]
    done = metering([*args, "--api-key", api_key], {**env, "METERING_SECRET_KEYS": keys})
    assert done.returncode == 0, done.stderr


def _mask(env: dict[str, str], user: str, keys: str) -> str | None:
    done = metering(["byollm", "show", "-u", user], {**env, "METERING_SECRET_KEYS": keys})
    assert done.returncode == 0, done.stderr
    mask: str | None = json.loads(done.stdout)["api_key_mask"]
    return mask


def test_rotation_re_encrypts_what_it_can_and_names_the_users_whose_key_it_cannot(cli_env) -> None:
    """One stored key nobody can decrypt any more aborted the whole rotation with 'a stored secret cannot be
    decrypted for rotation', naming no user: every other key stayed under the old key, which could then never be
    dropped, and the operator could not tell whose key was lost. The others are re-encrypted now (committed), the
    lost ones left as they are and named, and the command exits 1."""
    old, lost, new = generate_key(), generate_key(), generate_key()
    _set(cli_env, "u1", KEY_1, old)
    _set(cli_env, "u2", KEY_2, lost)
    error = one_error_line(metering(["keys", "rotate"], {**cli_env, "METERING_SECRET_KEYS": f"{new},{old}"}))
    assert "1 stored api key(s) cannot be decrypted" in error and "'u2'" in error and "'u1'" not in error, error
    assert _mask(cli_env, "u1", new) == "sk-…1111"  # re-encrypted under the new key: the old one may go
    assert _mask(cli_env, "u2", lost) == "sk-…2222"  # left as it was
