"""Where the configuration comes from: the TOML file and the process environment.

``load`` reads them and hands them to the pure ``core.config.build``, which applies the
precedence (flags, then environment, then file, then defaults) and the checks.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from etherd.core.config import Config, ConfigError, build

__all__ = ["DEFAULT_CONFIG_PATH", "load"]

DEFAULT_CONFIG_PATH: Final = Path("conf/etherd.toml")


def load(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the effective configuration.

    Args:
        path: TOML file; None means ``$ETHERD_CONFIG`` or ``conf/etherd.toml`` if present.
        env: the environment to read ``ETHERD_<SECTION>_<KEY>`` from (default os.environ).
        overrides: values from command-line flags, as ``{section: {key: value}}``.

    Raises:
        ConfigError: a file that cannot be read or parsed, an unknown key, a bad value.
    """
    env = os.environ if env is None else env
    if path is None and env.get("ETHERD_CONFIG"):
        path = env["ETHERD_CONFIG"]
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    raw = _read_toml(Path(path)) if path is not None else {}
    return build(raw, env=env, overrides=overrides)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
