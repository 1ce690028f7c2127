"""The route table: ``(method, path template) -> handler``, resolved without regexes.

Templates are ``/``-separated; a segment written ``{name}`` captures one path segment.
Resolution answers 404 for an unknown path and 405 (naming the allowed methods) for a known
path with another method, as contract section 8 asks.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar
from urllib.parse import unquote

from etherd.core.errors import Refusal

__all__ = ["OTHER_ROUTE", "LabelledRouter", "Router"]

H = TypeVar("H")

# The label of requests no route matches (metrics).
OTHER_ROUTE: Final = "other"
# Methods a CORS preflight may be told a route takes.
_CORS_METHODS: Final = ("GET", "POST", "PUT", "PATCH", "DELETE")


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
            Refusal: ``not_found`` or ``method_not_allowed``.
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
            raise Refusal("not_found", f"no route for {path}")
        handler = node.handlers.get(method)
        if handler is None:
            if method == "HEAD" and "GET" in node.handlers:
                return node.handlers["GET"], params
            allowed = ", ".join(sorted(node.handlers))
            raise Refusal("method_not_allowed", f"{method} is not allowed on {path}; use {allowed}")
        return handler, params


class LabelledRouter(Router[H]):
    """A ``Router`` that also says which route template a request matched (metrics labels,
    never raw paths, so the label set stays bounded) and which methods a path takes."""

    def __init__(self) -> None:
        super().__init__()
        self._templates: Router[str] = Router()
        self._streaming: set[tuple[str, str]] = set()

    def add(self, method: str, template: str, handler: H, *, streams: bool = False) -> None:
        """Register a handler; ``streams``: it may take the connection over."""
        super().add(method, template, handler)
        self._templates.add(method, template, template)
        if streams:
            self._streaming.add((method, template))

    def streams(self, method: str, path: str) -> bool:
        """Whether the route a request resolves to may take the connection over."""
        if not self._streaming:
            return False
        if method == "HEAD":
            method = "GET"
        return (method, self.template(method, path)) in self._streaming

    def template(self, method: str, path: str) -> str:
        """The template of the route a request resolves to, or ``OTHER_ROUTE``."""
        try:
            return self._templates.resolve(method, path)[0]
        except Refusal:
            return OTHER_ROUTE

    def methods(self, path: str) -> list[str]:
        """The methods (of those a browser may preflight) that ``path`` takes."""
        allowed = []
        for method in _CORS_METHODS:
            try:
                self._templates.resolve(method, path)
            except Refusal:
                continue
            allowed.append(method)
        return allowed
