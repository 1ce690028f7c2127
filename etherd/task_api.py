"""Task routes: the product API (create, read, answer, cancel, activity) and the harness API
(claimable, preview, claim, heartbeat, steps, interrupt, result), plus the lease sweep.

Every change follows one path, ``mutate``: read the task, ``tasks.apply`` the action (pure,
raises the refusal), then commit the new row and its events in ONE write with optimistic
concurrency on the row's version. Task state and event history therefore never disagree,
and a 2xx means both are stored. Two claims racing for one task, on one process or on two
sharing a PostgreSQL database, both read version v; one commit wins, the other gets a
``TaskConflict``, re-reads, and is refused by the table (``already_claimed``).

The read is usually free: each process keeps the last row it committed or read of up to
``TASK_CACHE_SIZE`` tasks that are not final (least recently used dropped first), and
``mutate`` starts from that row instead of reading the store. The row may be stale when
another process changed the task since, and that is safe because nothing is decided on a
cached row alone: an accepted change still has to pass the commit's version check (a stale
row gets ``TaskConflict``, which drops it and reads the store), and a refusal computed from
a cached row is computed again from a fresh read before it is answered (another process
may have claimed, answered or expired the task meanwhile). The GET routes always read the
store, so they show another process's change at once.

Who may do what (contract sections 2 and 3): a ``user`` reads, answers and cancels its own
tasks; ``service`` and ``admin`` act for any owner. Harness routes take a ``harness`` or
``admin`` token for any task, and also a ``user`` token for the user's own tasks, because
public-contract harnesses run with the user's token; all of them need the
``X-Ether-Harness-App`` header. Someone else's task answers 404, exactly like a missing
one, so task ids cannot be probed; that includes ``GET /api/tasks/{id}/events``, which
otherwise authorises the stream like ``GET /api/events?topic=tasks/{id}`` (a harness token
may follow only a task it holds: another's task is 403 there).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import msgspec

from etherd.api import (
    answer_of_conflict,
    authenticate,
    decode_json,
    events,
    idempotency,
    json_response,
    replayed,
)
from etherd.app import App
from etherd.auth import Principal, Role, check_harness_app
from etherd.clock import rfc3339_ms
from etherd.errors import ApiError
from etherd.eventlog import StoredEvent, TaskWrite, Write
from etherd.http import Request, Response, Stream
from etherd.messages import (
    ENCODER,
    AnswerBody,
    ClaimBody,
    CreateTaskBody,
    InterruptBody,
    ResultBody,
    RunBody,
    StepBody,
)
from etherd.store import IdempotencyConflict, StoreUnavailable, TaskConflict
from etherd.tasks import (
    TERMINAL,
    Action,
    Answer,
    Cancel,
    Claim,
    Create,
    Expire,
    Heartbeat,
    Interrupt,
    Result,
    Status,
    Step,
    Task,
    apply,
    bundle,
    claim_view,
    heartbeat_view,
    task_topic,
)

__all__ = ["TaskCache", "install", "sweep_leases", "task_cache"]

log = logging.getLogger("etherd.tasks")

TASK_DECODER: Final = msgspec.json.Decoder(Task)
# Optimistic writes retried before answering 409: only a burst of concurrent changes to one
# task exhausts this.
MAX_ATTEMPTS: Final = 5
PAGE_MAX: Final = 200
# Task rows each process keeps for mutate (see the module docstring).
TASK_CACHE_SIZE: Final = 10_000


def install(app: App) -> None:
    """Register the task routes."""
    r = app.router
    r.add("POST", "/api/tasks", lambda req, p: create(app, req))
    r.add("GET", "/api/tasks/{id}", lambda req, p: get_task(app, req, p["id"]))
    r.add("GET", "/api/tasks/{id}/delivery", lambda req, p: get_delivery(app, req, p["id"]))
    r.add("GET", "/api/tasks/{id}/timeline", lambda req, p: timeline(app, req, p["id"]))
    r.add("GET", "/api/tasks/{id}/events", lambda req, p: task_events(app, req, p["id"]))
    r.add("POST", "/api/tasks/{id}/answer", lambda req, p: answer(app, req, p["id"]))
    r.add("POST", "/api/tasks/{id}/cancel", lambda req, p: cancel(app, req, p["id"]))
    r.add("GET", "/api/activity", lambda req, p: activity(app, req))
    h = "/api/harness/tasks"
    r.add("GET", f"{h}/claimable", lambda req, p: claimable(app, req))
    r.add("GET", f"{h}/{{id}}/execution", lambda req, p: preview(app, req, p["id"]))
    r.add("POST", f"{h}/{{id}}/claim", lambda req, p: claim(app, req, p["id"]))
    r.add("POST", f"{h}/{{id}}/heartbeat", lambda req, p: heartbeat(app, req, p["id"]))
    r.add("POST", f"{h}/{{id}}/steps", lambda req, p: step(app, req, p["id"]))
    r.add("POST", f"{h}/{{id}}/interrupt", lambda req, p: interrupt(app, req, p["id"]))
    r.add("POST", f"{h}/{{id}}/result", lambda req, p: result(app, req, p["id"]))


# -- reading and writing tasks -------------------------------------------------------------


def now_ms() -> int:
    """Server time in milliseconds."""
    return int(time.time() * 1000)


async def load(app: App, task_id: str) -> Task | None:
    """The stored task, or None."""
    try:
        raw = await app.store.get_task(task_id)
    except StoreUnavailable as exc:
        raise ApiError("not_ready", f"the store is unavailable: {exc}") from None
    return None if raw is None else TASK_DECODER.decode(raw)


class TaskCache:
    """The latest row this process committed or read of recently changed tasks.

    A hint, never the truth: ``mutate`` uses a row from here only where the store's version
    check (or a fresh read) confirms what it decides. Final tasks are not kept (nothing
    changes them any more). A row never replaces a newer one of the same task, so a slow
    read cannot undo what a faster commit put here.
    """

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: OrderedDict[str, Task] = OrderedDict()

    def get(self, task_id: str) -> Task | None:
        task = self.rows.get(task_id)
        if task is not None:
            self.rows.move_to_end(task_id)
        return task

    def put(self, task: Task) -> None:
        rows = self.rows
        if task.status in TERMINAL:
            rows.pop(task.id, None)
            return
        held = rows.get(task.id)
        if held is not None and held.version > task.version:
            return
        rows[task.id] = task
        rows.move_to_end(task.id)
        if len(rows) > TASK_CACHE_SIZE:
            rows.popitem(last=False)

    def drop(self, task_id: str) -> None:
        self.rows.pop(task_id, None)


# One cache per App (tests run several in one process, each with its own store).
_CACHES: Final[weakref.WeakKeyDictionary[App, TaskCache]] = weakref.WeakKeyDictionary()


def task_cache(app: App) -> TaskCache:
    """The task row cache of ``app``."""
    cache = _CACHES.get(app)
    if cache is None:
        cache = _CACHES[app] = TaskCache()
    return cache


def _row(task: Task, expected: int) -> TaskWrite:
    return TaskWrite(
        id=task.id,
        owner=task.owner,
        status=str(task.status),
        created_ms=task.created_ms,
        updated_ms=task.updated_ms,
        lease_expires_ms=task.lease_expires_ms,
        holder=task.holder,
        version=task.version,
        expected_version=expected,
        data=ENCODER.encode(task),
    )


View = Callable[[Task], tuple[int, bytes]]


async def mutate(
    app: App,
    task_id: str,
    action: Callable[[], Action],
    check: Callable[[Task | None], None],
    view: View,
    request: Request | None = None,
    principal: Principal | None = None,
) -> Response:
    """Apply an action and store the task with its events in one commit.

    ``check`` authorises the caller against the task as read; ``view`` renders the answer
    (it is also stored under the request's idempotency key, in the same commit). The task
    is taken from the process's ``TaskCache`` when it is there; a refusal (from ``check``
    or ``apply``) computed from a cached row is confirmed against a fresh read first.
    """
    idem = None
    if request is not None and principal is not None:
        idem = idempotency(request, principal)
        if idem is not None:
            earlier = await replayed(app, idem)
            if earlier is not None:
                return earlier
    cache = task_cache(app)
    reads = 0
    while reads < MAX_ATTEMPTS:
        task = cache.get(task_id)
        cached = task is not None
        if not cached:
            reads += 1
            task = await load(app, task_id)
            if task is not None:
                cache.put(task)
        try:
            check(task)
            outcome = apply(task, action())
        except ApiError:
            if not cached:
                raise
            # Decided on a row another process may have moved on from: ask the store.
            cache.drop(task_id)
            continue
        new = outcome.task
        answer = view(new)
        write = Write(
            outcome.events,
            idem,
            _constant(answer) if idem is not None else None,
            task=_row(new, 0 if task is None else task.version),
        )
        try:
            await app.commit(write)
        except TaskConflict:
            cache.drop(task_id)
            continue
        except IdempotencyConflict as exc:
            return answer_of_conflict(exc, write)
        except BaseException:
            # Not stored, or not known whether it was: the next change reads the store.
            cache.drop(task_id)
            raise
        cache.put(new)
        return Response(answer[0], answer[1])
    raise ApiError("conflict", f"task {task_id} is changing too fast; retry")


def _constant(answer: tuple[int, bytes]) -> Callable[[list[StoredEvent]], tuple[int, bytes]]:
    """The idempotent answer of a task change does not depend on the stored offsets."""

    def respond(_stored: list[StoredEvent]) -> tuple[int, bytes]:
        return answer

    return respond


def _json(status: int, body: object) -> tuple[int, bytes]:
    return status, ENCODER.encode(body)


# -- product API ---------------------------------------------------------------------------


def task_view(task: Task) -> dict[str, Any]:
    """What ``GET /api/tasks/{id}`` shows: everything a page needs on load."""
    data: dict[str, Any] = msgspec.to_builtins(task)
    for key in ("created_ms", "updated_ms", "lease_expires_ms", "version", "holder"):
        data.pop(key, None)
    data["created_at"] = rfc3339_ms(task.created_ms)
    data["updated_at"] = rfc3339_ms(task.updated_ms)
    data["lease_expires_at"] = (
        None if task.lease_expires_ms is None else rfc3339_ms(task.lease_expires_ms)
    )
    data["topic"] = task_topic(task.id)
    return data


def _owner_check(principal: Principal, task_id: str) -> Callable[[Task | None], None]:
    def check(task: Task | None) -> None:
        if task is None or (task.owner != principal.sub and not principal.may_act_for_anyone):
            raise ApiError("not_found", f"no task {task_id}")

    return check


def _product_principal(app: App, request: Request) -> Principal:
    principal = authenticate(app, request)
    if principal.role is Role.HARNESS:
        raise ApiError("forbidden", "harness tokens use the harness API, not the product API")
    return principal


async def create(app: App, request: Request) -> Response:
    """``POST /api/tasks`` -> 201 with the task."""
    principal = _product_principal(app, request)
    body = decode_json(request, CreateTaskBody)
    owner = principal.sub
    if body.owner is not None and body.owner != principal.sub:
        if not principal.may_act_for_anyone:
            raise ApiError("forbidden", "only service and admin tokens may set owner")
        owner = body.owner
    limit = app.config.tasks.max_prompt_bytes
    if len(body.prompt.encode()) > limit:
        raise ApiError(
            "payload_too_large", f"prompt exceeds {limit} bytes (tasks.max_prompt_bytes)"
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

    def check(task: Task | None) -> None:
        return None

    return await mutate(
        app, task_id, action, check, lambda t: _json(201, task_view(t)), request, principal
    )


async def _readable(app: App, request: Request, task_id: str) -> Task:
    principal = _product_principal(app, request)
    task = await load(app, task_id)
    _owner_check(principal, task_id)(task)
    assert task is not None
    return task


async def get_task(app: App, request: Request, task_id: str) -> Response:
    """``GET /api/tasks/{id}``: status, last step, pending question, delivery."""
    return json_response(200, task_view(await _readable(app, request, task_id)))


async def get_delivery(app: App, request: Request, task_id: str) -> Response:
    """``GET /api/tasks/{id}/delivery``: the persisted delivery card."""
    task = await _readable(app, request, task_id)
    if task.delivery is None:
        raise ApiError("not_found", f"task {task_id} has no delivery yet (status {task.status})")
    body = msgspec.to_builtins(task.delivery)
    body["task_id"] = task.id
    return json_response(200, body)


async def timeline(app: App, request: Request, task_id: str) -> Response:
    """``GET /api/tasks/{id}/timeline?since=&limit=``: timeline entries with their offsets."""
    await _readable(app, request, task_id)
    since = _int_param(request, "since", 0)
    limit = min(_int_param(request, "limit", 100), 1000)
    if limit < 1:
        raise ApiError("bad_request", "limit must be at least 1")
    replay = await app.read(task_topic(task_id), since, limit * 8)
    entries = []
    last = since
    for ev in replay.events:
        last = ev.offset
        if ev.event == "task.timeline":
            data = msgspec.json.decode(ev.data)
            entries.append({"offset": ev.offset, **data["entry"]})
            if len(entries) >= limit:
                break
    return json_response(200, {"task_id": task_id, "entries": entries, "next": last})


def _int_param(request: Request, name: str, default: int) -> int:
    text = request.param(name)
    if text is None or text == "":
        return default
    if not text.isdigit():
        raise ApiError("bad_request", f"{name} must be a non-negative integer, got {text[:40]!r}")
    return int(text)


async def task_events(app: App, request: Request, task_id: str) -> Stream:
    """``GET /api/tasks/{id}/events``: the task's SSE stream.

    A missing task and, for a user token, someone else's task answer 404 like every task
    route; then the stream is authorised like ``/api/events?topic=tasks/{id}``.
    """
    principal = authenticate(app, request, query_token=True)
    task = await load(app, task_id)
    if task is None or (principal.role is Role.USER and task.owner != principal.sub):
        raise ApiError("not_found", f"no task {task_id}")
    return await events(app, request, task_topic(task_id))


async def answer(app: App, request: Request, task_id: str) -> Response:
    """``POST /api/tasks/{id}/answer``: the user answers the pending question."""
    principal = _product_principal(app, request)
    body = decode_json(request, AnswerBody)
    at = now_ms()
    return await mutate(
        app,
        task_id,
        lambda: Answer(answer=body.answer, option=body.option, now_ms=at),
        _owner_check(principal, task_id),
        lambda t: _json(200, task_view(t)),
        request,
        principal,
    )


async def cancel(app: App, request: Request, task_id: str) -> Response:
    """``POST /api/tasks/{id}/cancel``: the owner cancels a queued or parked task."""
    principal = _product_principal(app, request)
    at = now_ms()
    return await mutate(
        app,
        task_id,
        lambda: Cancel(now_ms=at),
        _owner_check(principal, task_id),
        lambda t: _json(200, task_view(t)),
        request,
        principal,
    )


async def activity(app: App, request: Request) -> Response:
    """``GET /api/activity?limit=&cursor=``: the caller's tasks, newest change first."""
    principal = _product_principal(app, request)
    limit = min(max(_int_param(request, "limit", 50), 1), PAGE_MAX)
    before = _cursor(request.param("cursor"))
    owner = request.param("owner") if principal.may_act_for_anyone else None
    try:
        rows = await app.store.list_tasks(owner or principal.sub, limit + 1, before)
    except StoreUnavailable as exc:
        raise ApiError("not_ready", f"the store is unavailable: {exc}") from None
    tasks = [TASK_DECODER.decode(row) for row in rows]
    page, more = tasks[:limit], len(tasks) > limit
    items = [
        {
            "task_id": t.id,
            "status": t.status,
            "title": t.title,
            "last_step_message": t.last_step.user_message if t.last_step else None,
            "updated_at": rfc3339_ms(t.updated_ms),
        }
        for t in page
    ]
    cursor = f"{page[-1].updated_ms}.{page[-1].id}" if more and page else None
    return json_response(200, {"tasks": items, "next_cursor": cursor})


def _cursor(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None
    ms, _, task_id = text.partition(".")
    if not ms.isdigit() or not task_id:
        raise ApiError("bad_request", "cursor is not one this server handed out")
    return int(ms), task_id


# -- harness API ---------------------------------------------------------------------------


def _harness(app: App, request: Request) -> tuple[Principal, str]:
    """The caller of a harness route and its app id (from ``X-Ether-Harness-App``)."""
    principal = authenticate(app, request)
    if principal.role is Role.SERVICE:
        raise ApiError("forbidden", "service tokens cannot act as a harness")
    app_id = request.headers.get("x-ether-harness-app")
    check_harness_app(app_id, app.config.auth.harness_apps)
    assert app_id is not None
    return principal, app_id


def _harness_check(principal: Principal, task_id: str) -> Callable[[Task | None], None]:
    def check(task: Task | None) -> None:
        if task is None or (principal.role is Role.USER and task.owner != principal.sub):
            raise ApiError("not_found", f"no task {task_id}")

    return check


def _lease_ms(app: App) -> int:
    return int(app.config.tasks.lease_s * 1000)


async def claimable(app: App, request: Request) -> Response:
    """``GET /api/harness/tasks/claimable``: queued tasks, oldest first."""
    principal, _ = _harness(app, request)
    limit = min(max(_int_param(request, "limit", 50), 1), PAGE_MAX)
    try:
        rows = await app.store.claimable_tasks(limit if principal.role is not Role.USER else 1000)
    except StoreUnavailable as exc:
        raise ApiError("not_ready", f"the store is unavailable: {exc}") from None
    tasks = [TASK_DECODER.decode(row) for row in rows]
    if principal.role is Role.USER:
        tasks = [t for t in tasks if t.owner == principal.sub][:limit]
    items = [
        {
            "task_id": t.id,
            "title": t.title,
            "status": t.status,
            "created_at": rfc3339_ms(t.created_ms),
            "updated_at": rfc3339_ms(t.updated_ms),
        }
        for t in tasks
    ]
    return json_response(200, {"tasks": items})


async def preview(app: App, request: Request, task_id: str) -> Response:
    """``GET /api/harness/tasks/{id}/execution``: the bundle, without claiming."""
    principal, _ = _harness(app, request)
    task = await load(app, task_id)
    _harness_check(principal, task_id)(task)
    assert task is not None
    return json_response(200, bundle(task, app.config.public_url))


async def claim(app: App, request: Request, task_id: str) -> Response:
    """``POST /api/harness/tasks/{id}/claim``: lease, ``run_id`` and the bundle."""
    principal, app_id = _harness(app, request)
    body = decode_json(request, ClaimBody) if request.body else ClaimBody()
    run_id = "run_" + secrets.token_hex(10)
    at = now_ms()
    base = app.config.public_url
    return await mutate(
        app,
        task_id,
        lambda: Claim(
            app_id=body.app_id or app_id,
            holder=principal.sub,
            run_id=run_id,
            now_ms=at,
            lease_ms=_lease_ms(app),
        ),
        _harness_check(principal, task_id),
        lambda t: _json(200, claim_view(t, base)),
        request,
        principal,
    )


async def heartbeat(app: App, request: Request, task_id: str) -> Response:
    """``POST .../heartbeat``: extend the lease; tells the status and any answer."""
    principal, _ = _harness(app, request)
    body = decode_json(request, RunBody)
    at = now_ms()
    return await mutate(
        app,
        task_id,
        lambda: Heartbeat(run_id=body.run_id, now_ms=at, lease_ms=_lease_ms(app)),
        _harness_check(principal, task_id),
        lambda t: _json(200, heartbeat_view(t)),
        request,
        principal,
    )


def _run_view(task: Task) -> tuple[int, bytes]:
    lease = None if task.lease_expires_ms is None else rfc3339_ms(task.lease_expires_ms)
    return _json(
        200,
        {
            "task_id": task.id,
            "status": task.status,
            "run_id": task.run_id,
            "lease_expires_at": lease,
        },
    )


async def step(app: App, request: Request, task_id: str) -> Response:
    """``POST .../steps``: narration for the live UI (``os.harness.step``)."""
    principal, _ = _harness(app, request)
    body = decode_json(request, StepBody)
    limit = app.config.tasks.max_user_message_bytes
    if len(body.user_message.encode()) > limit:
        raise ApiError(
            "payload_too_large",
            f"user_message exceeds {limit} bytes (tasks.max_user_message_bytes)",
        )
    at = now_ms()
    return await mutate(
        app,
        task_id,
        lambda: Step(
            run_id=body.run_id,
            phase=body.phase,
            user_message=body.user_message,
            internal_label=body.internal_label,
            now_ms=at,
        ),
        _harness_check(principal, task_id),
        _run_view,
        request,
        principal,
    )


async def interrupt(app: App, request: Request, task_id: str) -> Response:
    """``POST .../interrupt``: park the task with a question; the run stays alive."""
    principal, _ = _harness(app, request)
    body = decode_json(request, InterruptBody)
    at = now_ms()
    return await mutate(
        app,
        task_id,
        lambda: Interrupt(
            run_id=body.run_id, question=body.question, options=body.options, now_ms=at
        ),
        _harness_check(principal, task_id),
        _run_view,
        request,
        principal,
    )


async def result(app: App, request: Request, task_id: str) -> Response:
    """``POST .../result``: the ExecutionResult; composes and stores the delivery."""
    principal, _ = _harness(app, request)
    body = decode_json(request, ResultBody)
    at = now_ms()

    def view(task: Task) -> tuple[int, bytes]:
        out: dict[str, Any] = {"task_id": task.id, "status": task.status}
        if task.delivery is not None and task.status is not Status.INTERRUPTED:
            out["delivery"] = msgspec.to_builtins(task.delivery)
        return _json(200, out)

    return await mutate(
        app,
        task_id,
        lambda: Result(
            run_id=body.run_id,
            status=body.status,
            agent_status=body.agent_status,
            artifact=body.artifact,
            working_summary=body.working_summary,
            question=body.question,
            options=body.options,
            error=body.error,
            now_ms=at,
        ),
        _harness_check(principal, task_id),
        view,
        request,
        principal,
    )


# -- lease sweep ---------------------------------------------------------------------------


async def sweep_leases(app: App) -> None:
    """Return tasks whose lease expired to the queue (or end their parked run), forever."""
    interval = app.config.tasks.sweep_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            rows = await app.store.expired_leases(now_ms(), 500)
        except StoreUnavailable:
            continue
        for row in rows:
            task = TASK_DECODER.decode(row)
            try:
                await mutate(app, task.id, lambda: Expire(now_ms=now_ms()), _no_check, _run_view)
            except ApiError as exc:
                # Renewed by a heartbeat or claimed meanwhile: nothing to do.
                log.debug("lease sweep skipped %s: %s", task.id, exc.message)


def _no_check(task: Task | None) -> None:
    return None
