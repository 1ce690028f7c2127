"""The systemd protocols (notify, watchdog, LISTEN_FDS) and the socket and reload helpers."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from etherd.core.config import Config, ConfigError
from etherd.edge.ops.configfile import load
from etherd.edge.ops.systemd import Notifier, listen_fds, watchdog_interval
from etherd.server import RESTART_ONLY, adopt_socket, config_changes


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake systemd: a unix datagram socket bound to a path."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield sock, path


def test_notify_sends_one_datagram_per_message(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("listening on 127.0.0.1:8080")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:8080"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping("draining", extend_s=2.5)
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining\nEXTEND_TIMEOUT_USEC=2500000"
    assert notifier.reloading()
    reloading = sock.recv(4096).decode().split("\n")
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    notifier.close()


def test_notify_to_an_abstract_socket() -> None:
    name = f"etherd-unit-{uuid.uuid4().hex[:12]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
        notifier.close()


def test_notify_is_a_no_op_without_a_socket_and_never_raises(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready() is False
    assert Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled is False
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.ready() is False  # the supervisor went away: logged, not raised
    gone.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_listen_fds_takes_the_sockets_and_clears_the_environment() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        fd = os.dup(listener.fileno())
        os.set_inheritable(fd, True)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"}
        socks = listen_fds(env, first_fd=fd)
        assert env == {}
        assert len(socks) == 1
        with socks[0] as sock:
            assert sock.fileno() == fd
            assert sock.getsockname() == listener.getsockname()
            assert sock.type == socket.SOCK_STREAM
            assert not os.get_inheritable(fd)


def test_listen_fds_for_another_process_or_none() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert listen_fds(env) == []
    assert env == {}  # removed all the same, so children do not take them
    assert listen_fds({}) == []
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"})


def test_adopt_socket_uses_the_sockets_address() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        config = adopt_socket(Config(), sock)
        assert config.server.host == "127.0.0.1"
        assert config.server.port == sock.getsockname()[1]
        assert config.dev_auth  # loopback without keys: development mode as usual


def test_adopt_socket_refuses_udp_and_dev_auth_on_the_network() -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as udp, pytest.raises(ConfigError, match="TCP"):
        adopt_socket(Config(), udp)
    forced = msgspec.convert({"auth": {"dev": True}}, Config)
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        with pytest.raises(ConfigError, match="loopback"):
            adopt_socket(forced, sock)
        # With no keys at all, a network socket is refused too: nothing could verify tokens.
        with pytest.raises(ConfigError, match="no way to verify tokens"):
            adopt_socket(Config(), sock)
        # Automatic dev mode just stays off on a network socket.
        keyed = msgspec.convert({"auth": {"secret": "s" * 40}}, Config)
        assert not adopt_socket(keyed, sock).dev_auth


def test_config_changes_mask_secrets(tmp_path: Path) -> None:
    old = load(None, env={"ETHERD_AUTH_SECRET": "s" * 40})
    new = load(
        None,
        env={
            "ETHERD_AUTH_SECRET": "t" * 40,
            "ETHERD_LOG_LEVEL": "debug",
            "ETHERD_STORE_URL": "postgresql://u:hunter2@db/etherd",
        },
    )
    changes = {key: (a, b) for key, a, b in config_changes(old, new)}
    assert set(changes) == {"auth.secret", "log.level", "store.url"}
    assert changes["log.level"] == ('"info"', '"debug"')
    assert "s" * 40 not in str(changes) and "t" * 40 not in str(changes)
    assert "hunter2" not in str(changes)
    assert config_changes(old, old) == []


def test_restart_only_keys_exist() -> None:
    defaults = msgspec.to_builtins(Config())
    for key in RESTART_ONLY:
        section, name = key.split(".")
        assert name in defaults[section], key
