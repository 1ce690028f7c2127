"""A small HTTP/1.1 client over asyncio streams: keep-alive connections, JSON bodies.

Why not a library: etherd already parses HTTP with ``httptools`` (a runtime dependency),
and the client needs only a sliver of HTTP: requests with a ``Content-Length`` body to one
origin, answers with a ``Content-Length`` or chunked body. ``httptools.HttpResponseParser``
does the parsing (chunked coding included), so this file only keeps connections, writes
request heads and hands back ``Response`` objects.

Connections are kept per client (up to ``max_idle``) and reused; a request that fails on a
reused connection before any answer byte arrived is sent once more on a new connection,
because the server may have closed an idle keep-alive connection meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httptools
import msgspec

from etherd.client.errors import TransportError

__all__ = ["HttpClient", "Response"]


class Response(NamedTuple):
    """An answer: status, headers (lower-case names) and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (None when empty or not JSON)."""
        if not self.body:
            return None
        try:
            return msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return None


class _Parsed:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False
        self.keep_alive = False
        self.parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked here: once the message is complete the parser forgets what it saw.
        self.keep_alive = bool(self.parser.should_keep_alive())


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Requests to one origin (``http://host:port`` or ``https://...``)."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, max_idle: int = 4) -> None:
        """
        Args:
            base_url: scheme, host and port (a path is ignored).
            timeout: seconds for connecting and for each answer.
            max_idle: keep-alive connections kept for reuse.
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._host_header = parts.netloc
        self.timeout = timeout
        self._max_idle = max_idle
        self._idle: list[_Connection] = []

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send one request and read its whole answer.

        Raises:
            TransportError: the server cannot be reached or broke the connection.
        """
        head = self._head(method, path, body, headers or {})
        while self._idle:
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, head, body)
            except _Stale:
                continue  # closed by the server while idle: try the next one
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=self._ssl), self.timeout
            )
        except (OSError, TimeoutError) as exc:
            raise TransportError(f"cannot reach {self.origin}: {_reason(exc)}") from None
        try:
            return await self._exchange(_Connection(reader, writer), head, body)
        except _Stale as exc:
            raise TransportError(f"{self.origin} closed the connection: {exc}") from None

    def _head(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes | None) -> Response:
        parsed = _Parsed()
        parser = httptools.HttpResponseParser(parsed)
        parsed.parser = parser
        received = False
        try:
            conn.writer.write(head + (body or b""))
            await conn.writer.drain()
            while not parsed.complete:
                data = await asyncio.wait_for(conn.reader.read(65536), self.timeout)
                if not data:
                    if received:
                        raise TransportError(f"{self.origin} closed the connection mid-answer")
                    raise _Stale("the connection was closed before an answer")
                received = True
                parser.feed_data(data)
        except _Stale:
            conn.close()
            raise
        except httptools.HttpParserError as exc:
            conn.close()
            raise TransportError(f"{self.origin} sent a malformed answer: {exc}") from None
        except TimeoutError:
            conn.close()
            raise TransportError(
                f"{self.origin} did not answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            conn.close()
            if not received:
                raise _Stale(_reason(exc)) from None
            raise TransportError(f"connection to {self.origin} broke: {_reason(exc)}") from None
        except BaseException:
            conn.close()
            raise
        status = int(parser.get_status_code())
        if parsed.keep_alive and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return Response(status, parsed.headers, bytes(parsed.body))

    async def close(self) -> None:
        """Close the kept connections."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            # Let the transports finish closing before the caller's loop may end.
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()


class _Stale(Exception):
    """A connection failed before any answer byte: safe to send the request again."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
