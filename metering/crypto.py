"""Secrets at rest: Fernet/MultiFernet with rotatable keys.

Keys come from ``METERING_SECRET_KEYS`` (comma separated, newest first). In ``env=dev`` without keys, a
key is generated once into ``<data_dir>/secret.key`` (mode 0600) so the embedded default just works.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from metering.config import Settings
from metering.errors import ConfigError, SecretError


class SecretBox:
    """Encrypts and decrypts short secrets (provider api keys). Never logs or reprs a secret."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ConfigError("at least one Fernet key is required")
        fernets = []
        for position, key in enumerate(keys, start=1):
            try:
                fernets.append(Fernet(key.strip().encode()))
            except (ValueError, TypeError):  # which one, and what a key is; never the value
                raise ConfigError(
                    f"invalid Fernet key in METERING_SECRET_KEYS: key {position} of {len(keys)} is not 32 url-safe "
                    "base64-encoded bytes (44 characters, as `metering keys generate` prints)"
                ) from None
        self._fernet = MultiFernet(fernets)
        self.key_count = len(keys)

    def __repr__(self) -> str:
        return f"SecretBox(keys={self.key_count})"

    def encrypt(self, plaintext: str) -> bytes:
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise SecretError(
                "a stored secret cannot be decrypted with the configured keys "
                "(was the key that encrypted it removed from METERING_SECRET_KEYS?)"
            ) from None

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt ``token`` under the newest key."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken:
            raise SecretError("a stored secret cannot be decrypted for rotation") from None


def generate_key() -> str:
    return Fernet.generate_key().decode()


def _dev_key_file(data_dir: Path) -> str:
    """The dev key, generated on first use. Several processes may get here at once (``serve --workers``, a CLI
    command meanwhile): the key is written whole to a file of this process's own, then linked into place, which
    only the first one does; the others read that one (created in place, another process could read it empty, or
    fail on the file it had just seen missing)."""
    path = data_dir / "secret.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        draft = data_dir / f".secret.key.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(generate_key())
            with contextlib.suppress(FileExistsError):  # another process linked its key first: use that one
                os.link(draft, path)
        finally:
            draft.unlink(missing_ok=True)
    return path.read_text().strip()


def secret_box_from_settings(settings: Settings) -> SecretBox:
    if settings.secret_keys is not None:
        keys = [k for k in settings.secret_keys.get_secret_value().split(",") if k.strip()]
        return SecretBox(keys)
    if settings.env == "prod":
        raise ConfigError("METERING_SECRET_KEYS is required when METERING_ENV=prod")
    try:
        key = _dev_key_file(settings.data_dir)
    except OSError as exc:  # a data dir that cannot be created or written (was a traceback from every command)
        raise ConfigError(
            f"cannot write the dev secret key in {settings.data_dir}: {exc.strerror or exc}; set "
            "METERING_SECRET_KEYS (`metering keys generate`) or a writable METERING_DATA_DIR"
        ) from None
    return SecretBox([key])
