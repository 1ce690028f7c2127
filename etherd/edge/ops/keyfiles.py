"""Reading the key files the ``[auth]`` section names, for the pure authenticator."""

from __future__ import annotations

from pathlib import Path

from etherd.core.config import AuthConfig, ConfigError

__all__ = ["read_key_files"]


def read_key_files(config: AuthConfig) -> dict[str, bytes]:
    """The bytes of ``auth.public_keys`` and ``auth.private_key``, by the name configured.

    Raises:
        ConfigError: a file that cannot be read, naming the key and the reason.
    """
    named = [(f"auth.public_keys[{i}]", name) for i, name in enumerate(config.public_keys)]
    if config.private_key:
        named.append(("auth.private_key", config.private_key))
    files: dict[str, bytes] = {}
    for where, name in named:
        try:
            files[name] = Path(name).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {name}: {exc.strerror or exc}") from None
    return files
