"""The route table: ``(method, path template) -> handler``, resolved without regexes.

Templates are ``/``-separated; a segment written ``{name}`` captures one path segment.
Resolution answers 404 for an unknown path and 405 (naming the allowed methods) for a known
path with another method, as contract section 8 asks.
"""

from __future__ import annotations

from typing import Generic, TypeVar
from urllib.parse import unquote

from etherd.errors import ApiError

__all__ = ["Router"]

H = TypeVar("H")


class _Node(Generic[H]):
    __slots__ = ("capture", "children", "handlers", "param")

    def __init__(self) -> None:
        self.children: dict[str, _Node[H]] = {}
        self.capture: _Node[H] | None = None
        self.param = ""
        self.handlers: dict[str, H] = {}


class Router(Generic[H]):
    """Maps request paths to handlers."""

    def __init__(self) -> None:
        self._root: _Node[H] = _Node()
        self._exact: dict[str, _Node[H]] = {}

    def add(self, method: str, template: str, handler: H) -> None:
        """Register a handler; ``{name}`` segments capture."""
        node = self._root
        static = True
        for seg in template.strip("/").split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                static = False
                if node.capture is None:
                    node.capture = _Node()
                    node.capture.param = seg[1:-1]
                elif node.capture.param != seg[1:-1]:
                    raise ValueError(f"conflicting parameter names at {template}")
                node = node.capture
            else:
                node = node.children.setdefault(seg, _Node())
        if method in node.handlers:
            raise ValueError(f"duplicate route {method} {template}")
        node.handlers[method] = handler
        if static:
            self._exact[template] = node

    def resolve(self, method: str, path: str) -> tuple[H, dict[str, str]]:
        """Find the handler for a request.

        Raises:
            ApiError: ``not_found`` or ``method_not_allowed``.
        """
        params: dict[str, str] = {}
        node: _Node[H] | None = self._exact.get(path)
        if node is None:
            node = self._root
            for seg in path.strip("/").split("/"):
                nxt = node.children.get(seg)
                if nxt is None:
                    nxt = node.capture
                    if nxt is None or not seg:
                        node = None
                        break
                    params[nxt.param] = unquote(seg)
                node = nxt
        if node is None or not node.handlers:
            raise ApiError("not_found", f"no route for {path}")
        handler = node.handlers.get(method)
        if handler is None:
            if method == "HEAD" and "GET" in node.handlers:
                return node.handlers["GET"], params
            allowed = ", ".join(sorted(node.handlers))
            raise ApiError(
                "method_not_allowed", f"{method} is not allowed on {path}; use {allowed}"
            )
        return handler, params
