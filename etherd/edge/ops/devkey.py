"""The development key: a random HS256 secret kept in the data directory.

Development mode (no keys configured, loopback listener) accepts the token ``test`` and,
so that every role can be tried, tokens signed with this key. It is made on first use by
``etherd serve`` or ``etherd token``, whichever comes first, as a file only its owner may
read; both then sign and verify with the same bytes. The pure ``core.auth.Authenticator``
gets the bytes; it accepts them only while development mode is on, so the file is harmless
once real keys are configured.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from etherd.core.config import MIN_SECRET_BYTES, ConfigError

__all__ = ["DEV_KEY_FILE", "dev_key", "dev_key_path"]

DEV_KEY_FILE: Final = "dev-hs256.key"
# Random bytes in a new key, written as hex (so the file is twice as long).
_KEY_BYTES: Final = 32


def dev_key_path(data_dir: str) -> Path:
    """Where the development key of a data directory lives."""
    return Path(data_dir or ".") / DEV_KEY_FILE


def dev_key(data_dir: str) -> bytes:
    """The development key of ``data_dir``, made (mode 0600) if there is none yet.

    Raises:
        ConfigError: the file cannot be read or made, others may read it, or it is too
            short; the message names the file.
    """
    path = dev_key_path(data_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create(path)
        mode = path.stat().st_mode
        data = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot use the development key {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the development key {path} may be read by others (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}` or delete it"
        )
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the development key {path} holds {len(data)} bytes, fewer than "
            f"{MIN_SECRET_BYTES}; delete it and etherd makes a new one"
        )
    return data


def _create(path: Path) -> None:
    """Write a new key beside ``path`` and link it into place, so a process racing this one
    reads either no file or a whole key, never half of one."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(_KEY_BYTES) + "\n")
        # Another process may have made it first: then theirs is the key.
        with contextlib.suppress(FileExistsError):
            os.link(scratch, path)
    finally:
        scratch.unlink()
