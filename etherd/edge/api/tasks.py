"""The product task routes: create, read, delivery, timeline, events, answer, cancel, and
the caller's task grid (``/api/activity``).

A ``user`` reads, answers and cancels its own tasks; ``service`` and ``admin`` act for any
owner; ``harness`` tokens use the harness API instead. Someone else's task answers 404,
exactly like a missing one, so task ids cannot be probed; that includes
``GET /api/tasks/{id}/events``, which otherwise authorises the stream like
``GET /api/events?topic=tasks/{id}``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec

from etherd.core.auth import Authenticator, Principal, Role
from etherd.core.errors import Refusal
from etherd.core.tasks import Action, Answer, Cancel, Create, Task, task_topic
from etherd.core.wire import ENCODER, AnswerBody, CreateTaskBody
from etherd.edge.api.common import (
    IDEMPOTENCY_KEY,
    TOKEN_QUERY,
    Body,
    Param,
    Route,
    answer_of,
    authenticate,
    decode_json,
    idempotency,
    int_param,
    int_query,
    json_response,
)
from etherd.edge.api.realtime import RealtimeRoutes
from etherd.edge.api.taskviews import (
    ActivityPage,
    DeliveryView,
    TaskView,
    TimelineItem,
    TimelinePage,
    activity_item,
    delivery_view,
    task_view,
)
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response, Stream
from etherd.services.eventlog import EventLog
from etherd.services.state import ServerState
from etherd.services.taskservice import TaskService, now_ms

__all__ = ["TaskRoutes"]


def _cursor(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None
    ms, _, task_id = text.partition(".")
    if not (ms.isascii() and ms.isdigit()) or len(ms) > 18 or not task_id:
        raise Refusal("bad_request", "cursor is not one this server handed out")
    return int(ms), task_id


def _owner_check(principal: Principal, task_id: str) -> Callable[[Task | None], None]:
    def check(task: Task | None) -> None:
        if task is None or (task.owner != principal.sub and not principal.may_act_for_anyone):
            raise Refusal("not_found", f"no task {task_id}")

    return check


def _viewed(task: Task, status: int = 200) -> tuple[int, bytes]:
    return status, ENCODER.encode(task_view(task))


class TaskRoutes:
    """The product API over tasks."""

    def __init__(
        self,
        auth: Authenticator,
        tasks: TaskService,
        eventlog: EventLog,
        realtime: RealtimeRoutes,
        state: ServerState,
    ) -> None:
        self.auth = auth
        self.tasks = tasks
        self.eventlog = eventlog
        self.realtime = realtime
        self.state = state

    def routes(self) -> list[Route]:
        """The route table entries."""
        tag = "tasks"
        changed = {200: TaskView}
        return [
            Route(
                "POST",
                "/api/tasks",
                lambda req, p: self.create(req),
                summary="Create a task (owner: the caller, or any for service and admin)",
                body=CreateTaskBody,
                responses={201: TaskView},
                errors=(409,),
                params=(IDEMPOTENCY_KEY,),
                tag=tag,
            ),
            Route(
                "GET",
                "/api/tasks/{id}",
                lambda req, p: self.get(req, p["id"]),
                summary="The task as a page needs it on load",
                responses=changed,
                tag=tag,
            ),
            Route(
                "GET",
                "/api/tasks/{id}/delivery",
                lambda req, p: self.delivery(req, p["id"]),
                summary="The persisted delivery card (404 before there is one)",
                responses={200: DeliveryView},
                tag=tag,
            ),
            Route(
                "GET",
                "/api/tasks/{id}/timeline",
                lambda req, p: self.timeline(req, p["id"]),
                summary="Timeline entries after an offset",
                responses={200: TimelinePage},
                params=(
                    int_query("since", "Entries of events after this offset (default 0)"),
                    int_query("limit", "At most this many (tasks.max_timeline_page)"),
                ),
                tag=tag,
            ),
            Route(
                "GET",
                "/api/tasks/{id}/events",
                lambda req, p: self.events(req, p["id"]),
                streams=True,
                summary="The task's events as Server-Sent Events",
                responses={200: Body("text/event-stream", {"type": "string"})},
                params=(
                    int_query("since", "Replay events after this offset first"),
                    Param("Last-Event-ID", "header", {"type": "string"}),
                    TOKEN_QUERY,
                ),
                errors=(422,),
                tag=tag,
            ),
            Route(
                "POST",
                "/api/tasks/{id}/answer",
                lambda req, p: self.answer(req, p["id"]),
                summary="Answer the question the task asks; answers the task",
                body=AnswerBody,
                responses=changed,
                errors=(409,),
                params=(IDEMPOTENCY_KEY,),
                tag=tag,
            ),
            Route(
                "POST",
                "/api/tasks/{id}/cancel",
                lambda req, p: self.cancel(req, p["id"]),
                summary="Cancel a queued, running or parked task; answers the task",
                responses=changed,
                errors=(409,),
                params=(IDEMPOTENCY_KEY,),
                tag=tag,
            ),
            Route(
                "GET",
                "/api/activity",
                lambda req, p: self.activity(req),
                summary="The caller's tasks, newest change first",
                responses={200: ActivityPage},
                params=(
                    int_query("limit", "Page size (tasks.max_page_size)"),
                    Param("cursor", "query", {"type": "string"}, description="next_cursor"),
                    Param("owner", "query", {"type": "string"}, description="service/admin"),
                ),
                tag=tag,
            ),
        ]

    def _principal(self, request: Request) -> Principal:
        principal = authenticate(self.auth, request)
        if principal.role is Role.HARNESS:
            raise Refusal("forbidden", "harness tokens use the harness API, not the product API")
        return principal

    async def _change(
        self,
        request: Request,
        principal: Principal,
        task_id: str,
        action: Callable[[], Action],
        check: Callable[[Task | None], None],
        status: int = 200,
    ) -> Response:
        idem = idempotency(request, principal, self.state.config.http.max_idempotency_key_chars)
        answer = await self.tasks.mutate(
            task_id, action, check, lambda t: _viewed(t, status), idem, request.turn
        )
        return answer_of(answer)

    async def _readable(self, request: Request, task_id: str) -> Task:
        principal = self._principal(request)
        task = await self.tasks.load(task_id)
        _owner_check(principal, task_id)(task)
        assert task is not None
        return task

    async def create(self, request: Request) -> Response:
        """``POST /api/tasks`` -> 201 with the task."""
        principal = self._principal(request)
        body = decode_json(request, CreateTaskBody)
        owner = principal.sub
        if body.owner is not None and body.owner != principal.sub:
            if not principal.may_act_for_anyone:
                raise Refusal("forbidden", "only service and admin tokens may set owner")
            owner = body.owner
        limit = self.state.config.tasks.max_prompt_bytes
        if len(body.prompt.encode()) > limit:
            raise Refusal(
                "payload_too_large",
                f"prompt exceeds {limit} bytes (tasks.max_prompt_bytes)",
                limit="tasks.max_prompt_bytes",
            )
        task_id = "task_" + secrets.token_hex(10)
        at = now_ms()

        def action() -> Action:
            return Create(
                task_id=task_id,
                owner=owner,
                prompt=body.prompt,
                title=body.title,
                definition_of_done=body.definition_of_done,
                scope=body.scope,
                context_refs=body.context_refs,
                now_ms=at,
            )

        def anyone(task: Task | None) -> None:
            return None

        return await self._change(request, principal, task_id, action, anyone, 201)

    async def get(self, request: Request, task_id: str) -> Response:
        """``GET /api/tasks/{id}``: status, last step, pending question, delivery."""
        return json_response(200, task_view(await self._readable(request, task_id)))

    async def delivery(self, request: Request, task_id: str) -> Response:
        """``GET /api/tasks/{id}/delivery``: the persisted delivery card."""
        task = await self._readable(request, task_id)
        if task.delivery is None:
            raise Refusal("not_found", f"task {task_id} has no delivery yet (status {task.status})")
        return json_response(200, delivery_view(task, task.delivery))

    async def timeline(self, request: Request, task_id: str) -> Response:
        """``GET /api/tasks/{id}/timeline?since=&limit=``: timeline entries with offsets.

        Reads the task's events after ``since`` until ``limit`` entries are found or
        ``tasks.timeline_scan_events`` events were read; ``next`` is where to continue.
        """
        await self._readable(request, task_id)
        cfg = self.state.config.tasks
        since = int_param(request, "since", 0)
        limit = min(int_param(request, "limit", 100), cfg.max_timeline_page)
        if limit < 1:
            raise Refusal("bad_request", "limit must be at least 1")
        topic = task_topic(task_id)
        entries: list[TimelineItem] = []
        last = since
        scanned = 0
        chunk = max(limit, 100)
        while len(entries) < limit and scanned < cfg.timeline_scan_events:
            replay = await self.eventlog.read(
                topic, last, min(chunk, cfg.timeline_scan_events - scanned)
            )
            if not replay.events:
                break
            for ev in replay.events:
                last = ev.offset
                scanned += 1
                if ev.event == "task.timeline":
                    data = msgspec.json.decode(ev.data)
                    entries.append(
                        msgspec.convert({"offset": ev.offset, **data["entry"]}, TimelineItem)
                    )
                    if len(entries) >= limit:
                        break
        return json_response(200, TimelinePage(task_id=task_id, entries=entries, next=last))

    async def events(self, request: Request, task_id: str) -> Stream:
        """``GET /api/tasks/{id}/events``: the task's SSE stream.

        A missing task and, for a user token, someone else's task answer 404 like every
        task route; then the stream is authorised like ``/api/events?topic=tasks/{id}``.
        """
        principal = authenticate(self.auth, request, query_token=True)
        task = await self.tasks.load(task_id)
        if task is None or (principal.role is Role.USER and task.owner != principal.sub):
            raise Refusal("not_found", f"no task {task_id}")
        return await self.realtime.events(request, task_topic(task_id))

    async def answer(self, request: Request, task_id: str) -> Response:
        """``POST /api/tasks/{id}/answer``: the user answers the pending question."""
        principal = self._principal(request)
        body = decode_json(request, AnswerBody)
        at = now_ms()
        return await self._change(
            request,
            principal,
            task_id,
            lambda: Answer(answer=body.answer, option=body.option, now_ms=at),
            _owner_check(principal, task_id),
        )

    async def cancel(self, request: Request, task_id: str) -> Response:
        """``POST /api/tasks/{id}/cancel``: the owner cancels a queued or parked task."""
        principal = self._principal(request)
        at = now_ms()
        return await self._change(
            request, principal, task_id, lambda: Cancel(now_ms=at), _owner_check(principal, task_id)
        )

    async def activity(self, request: Request) -> Response:
        """``GET /api/activity?limit=&cursor=``: the caller's tasks, newest change first."""
        principal = self._principal(request)
        page_max = self.state.config.tasks.max_page_size
        limit = min(max(int_param(request, "limit", 50), 1), page_max)
        before = _cursor(request.param("cursor"))
        owner = request.param("owner") if principal.may_act_for_anyone else None
        tasks = await self.tasks.page(owner or principal.sub, limit + 1, before)
        page, more = tasks[:limit], len(tasks) > limit
        cursor = f"{page[-1].updated_ms}.{page[-1].id}" if more and page else None
        return json_response(
            200, ActivityPage(tasks=[activity_item(t) for t in page], next_cursor=cursor)
        )
