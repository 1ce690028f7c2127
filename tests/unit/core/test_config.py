"""Configuration: file, environment and flag precedence; unknown keys; the annotated file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from etherd.core.config import Config, ConfigError, masked
from etherd.edge.ops.configfile import load

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "conf" / "etherd.toml"
# Keys the shipped file documents in comments rather than setting (no usable default value).
COMMENTED = {("auth", "dev"), ("store", "retention")}


def test_shipped_file_sets_every_key_to_its_default() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    defaults = msgspec.to_builtins(Config())
    for section, values in defaults.items():
        assert section in data, f"[{section}] missing from conf/etherd.toml"
        for key, default in values.items():
            if (section, key) in COMMENTED:
                assert key in SHIPPED.read_text(), f"{section}.{key} not documented"
                continue
            assert key in data[section], f"{section}.{key} missing from conf/etherd.toml"
            assert data[section][key] == default, f"{section}.{key} differs from the default"
    assert load(SHIPPED, env={}) == Config()


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    path = tmp_path / "e.toml"
    path.write_text('[server]\nport = 9001\nhost = "127.0.0.2"\n[http]\nmax_headers = 7\n')
    env = {"ETHERD_SERVER_PORT": "9002", "ETHERD_HTTP_MAX_BODY_BYTES": "100"}
    config = load(path, env=env, overrides={"server": {"port": 9003, "host": None}})
    assert config.server.port == 9003  # flag beats environment
    assert config.server.host == "127.0.0.2"  # file beats default; None flag is "not given"
    assert config.http.max_body_bytes == 100  # environment beats default
    assert config.http.max_headers == 7
    assert load(path, env=env).server.port == 9002  # environment beats file


def test_environment_types_lists_and_booleans() -> None:
    env = {
        "ETHERD_AUTH_HARNESS_APPS": "a, b",
        "ETHERD_AUTH_DEV": "false",
        "ETHERD_REALTIME_PREFER_WEBSOCKET": "0",
        "ETHERD_STORE_RETENTION": '[{"prefix": "tasks/", "max_count": 5}]',
    }
    config = load(None, env=env)
    assert config.auth.harness_apps == ["a", "b"]
    assert config.auth.dev is False
    assert config.realtime.prefer_websocket is False
    assert config.store.retention[0].max_count == 5


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[server]\nprot = 1\n", "prot"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[server]\nport = 70000\n", "$.server.port"),
        ("[http]\nmax_body_bytes = 0\n", "$.http.max_body_bytes"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("$", r"\$").replace("[", r"\[")):
        load(path, env={})


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"ETHERD_SERVER_PROT": "1"}, "ETHERD_SERVER_PROT"),
        ({"ETHERD_NOPE_X": "1"}, "ETHERD_NOPE_X"),
        ({"ETHERD_SERVER_PORT": "eighty"}, "ETHERD_SERVER_PORT"),
        ({"ETHERD_AUTH_REQUIRE_EXP": "maybe"}, "true or false"),
    ],
)
def test_bad_environment_names_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load(None, env=env)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml", env={})


def test_dev_auth_rules() -> None:
    assert load(None, env={}).dev_auth is True  # no keys, loopback
    assert load(None, env={"ETHERD_AUTH_SECRET": "s" * 40}).dev_auth is False
    both = {"ETHERD_AUTH_SECRET": "s" * 40, "ETHERD_AUTH_DEV": "true"}
    assert load(None, env=both).dev_auth is True
    network = {"ETHERD_SERVER_HOST": "0.0.0.0", "ETHERD_AUTH_SECRET": "s" * 40}
    assert load(None, env=network).dev_auth is False
    with pytest.raises(ConfigError, match="loopback"):
        load(None, env={**network, "ETHERD_AUTH_DEV": "true"})


def test_a_network_listener_without_keys_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, env={"ETHERD_SERVER_HOST": "0.0.0.0"})
    message = str(info.value)
    assert "\n" not in message
    assert "'0.0.0.0'" in message and "auth.secret" in message and "auth.public_keys" in message


@pytest.mark.parametrize("size", [1, 5, 31])
def test_a_short_secret_is_refused_at_load(size: int) -> None:
    with pytest.raises(ConfigError, match=f"auth.secret is {size} bytes; HS256 needs at least 32"):
        load(None, env={"ETHERD_AUTH_SECRET": "s" * size})
    assert load(None, env={"ETHERD_AUTH_SECRET": "s" * 32}).auth.secret == "s" * 32


def test_store_url_default_and_check() -> None:
    config = load(None, env={"ETHERD_SERVER_DATA_DIR": "d"})
    assert config.store_url == "sqlite:///d/etherd.db"
    with pytest.raises(ConfigError, match=r"store\.url"):
        load(None, env={"ETHERD_STORE_URL": "mysql://x"})


def test_masked_hides_secrets() -> None:
    env = {"ETHERD_AUTH_SECRET": "s" * 40, "ETHERD_STORE_URL": "postgresql://u:pw@h:5432/db"}
    shown = masked(load(None, env=env))
    assert shown["auth"]["secret"] == "********"
    assert shown["store"]["url"] == "postgresql://u:********@h:5432/db"
    assert "pw" not in str(shown)
