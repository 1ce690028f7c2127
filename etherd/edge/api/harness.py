"""The harness routes (contract section 7): claimable, preview, claim, heartbeat, steps,
interrupt, result.

They take a ``harness`` or ``admin`` token for any task, and also a ``user`` token for the
user's own tasks, because public-contract harnesses run with the user's token; all of them
need the ``X-Ether-Harness-App`` header (and, when ``auth.harness_apps`` is set, one of the
listed values). Someone else's task answers 404 like a missing one.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from etherd.core.auth import Authenticator, Principal, Role, check_harness_app
from etherd.core.errors import Refusal
from etherd.core.tasks import Action, Claim, Heartbeat, Interrupt, Result, Step, Task
from etherd.core.wire import (
    ENCODER,
    ClaimBody,
    HeartbeatBody,
    InterruptBody,
    ResultBody,
    StepBody,
)
from etherd.edge.api.common import (
    HARNESS_APP,
    IDEMPOTENCY_KEY,
    Route,
    answer_of,
    authenticate,
    decode_json,
    idempotency,
    int_param,
    int_query,
    json_response,
)
from etherd.edge.api.taskviews import (
    Bundle,
    ClaimablePage,
    ClaimView,
    HeartbeatView,
    ResultView,
    RunView,
    bundle,
    claim_view,
    claimable_item,
    heartbeat_view,
    result_view,
    run_view,
)
from etherd.edge.http.request import Request
from etherd.edge.http.response import Response
from etherd.services.state import ServerState
from etherd.services.taskservice import TaskService, View, now_ms

__all__ = ["HarnessRoutes"]

H = "/api/harness/tasks"


def _check(principal: Principal, task_id: str) -> Callable[[Task | None], None]:
    def check(task: Task | None) -> None:
        if task is None or (principal.role is Role.USER and task.owner != principal.sub):
            raise Refusal("not_found", f"no task {task_id}")

    return check


def _view(render: Callable[[Task], object]) -> View:
    def view(task: Task) -> tuple[int, bytes]:
        return 200, ENCODER.encode(render(task))

    return view


class HarnessRoutes:
    """The harness API over tasks."""

    def __init__(self, auth: Authenticator, tasks: TaskService, state: ServerState) -> None:
        self.auth = auth
        self.tasks = tasks
        self.state = state

    def routes(self) -> list[Route]:
        """The route table entries."""
        tag = "harness"
        posted = (HARNESS_APP, IDEMPOTENCY_KEY)
        return [
            Route(
                "GET",
                f"{H}/claimable",
                lambda req, p: self.claimable(req),
                summary="Queued tasks, oldest first",
                responses={200: ClaimablePage},
                params=(HARNESS_APP, int_query("limit", "Page size (tasks.max_page_size)")),
                tag=tag,
            ),
            Route(
                "GET",
                f"{H}/{{id}}/execution",
                lambda req, p: self.preview(req, p["id"]),
                summary="The execution bundle, without claiming",
                responses={200: Bundle},
                params=(HARNESS_APP,),
                tag=tag,
            ),
            Route(
                "POST",
                f"{H}/{{id}}/claim",
                lambda req, p: self.claim(req, p["id"]),
                summary="Claim a queued task: run_id, lease and bundle",
                body=ClaimBody,
                body_required=False,
                responses={200: ClaimView},
                errors=(409,),
                params=posted,
                tag=tag,
            ),
            Route(
                "POST",
                f"{H}/{{id}}/heartbeat",
                lambda req, p: self.heartbeat(req, p["id"]),
                summary="Extend the lease; tells the status and a pending answer",
                body=HeartbeatBody,
                responses={200: HeartbeatView},
                errors=(409,),
                params=posted,
                tag=tag,
            ),
            Route(
                "POST",
                f"{H}/{{id}}/steps",
                lambda req, p: self.step(req, p["id"]),
                summary="Report a step (os.harness.step)",
                body=StepBody,
                responses={200: RunView},
                errors=(409,),
                params=posted,
                tag=tag,
            ),
            Route(
                "POST",
                f"{H}/{{id}}/interrupt",
                lambda req, p: self.interrupt(req, p["id"]),
                summary="Ask the user a question; the run stays alive",
                body=InterruptBody,
                responses={200: RunView},
                errors=(409,),
                params=posted,
                tag=tag,
            ),
            Route(
                "POST",
                f"{H}/{{id}}/result",
                lambda req, p: self.result(req, p["id"]),
                summary="Post the execution result; ends the run",
                body=ResultBody,
                responses={200: ResultView},
                errors=(409,),
                params=posted,
                tag=tag,
            ),
        ]

    def _caller(self, request: Request) -> tuple[Principal, str]:
        """The caller of a harness route and its app id (from ``X-Ether-Harness-App``)."""
        principal = authenticate(self.auth, request)
        if principal.role is Role.SERVICE:
            raise Refusal("forbidden", "service tokens cannot act as a harness")
        app_id = request.headers.get("x-ether-harness-app")
        check_harness_app(app_id, self.state.config.auth.harness_apps)
        assert app_id is not None
        return principal, app_id

    async def _change(
        self,
        request: Request,
        principal: Principal,
        task_id: str,
        action: Callable[[], Action],
        view: View,
    ) -> Response:
        idem = idempotency(request, principal, self.state.config.http.max_idempotency_key_chars)
        answer = await self.tasks.mutate(
            task_id, action, _check(principal, task_id), view, idem, request.turn
        )
        return answer_of(answer)

    def _lease_ms(self) -> int:
        return int(self.state.config.tasks.lease_s * 1000)

    async def claimable(self, request: Request) -> Response:
        """``GET /api/harness/tasks/claimable``: queued tasks, oldest first."""
        principal, _ = self._caller(request)
        page_max = self.state.config.tasks.max_page_size
        limit = min(max(int_param(request, "limit", 50), 1), page_max)
        # A user acting as its own harness sees only its own tasks.
        owner = principal.sub if principal.role is Role.USER else None
        tasks = await self.tasks.claimable(limit, owner)
        return json_response(200, ClaimablePage(tasks=[claimable_item(t) for t in tasks]))

    async def preview(self, request: Request, task_id: str) -> Response:
        """``GET /api/harness/tasks/{id}/execution``: the bundle, without claiming."""
        principal, _ = self._caller(request)
        task = await self.tasks.load(task_id)
        _check(principal, task_id)(task)
        assert task is not None
        return json_response(200, bundle(task, self.state.config.public_url))

    async def claim(self, request: Request, task_id: str) -> Response:
        """``POST /api/harness/tasks/{id}/claim``: lease, ``run_id`` and the bundle."""
        principal, app_id = self._caller(request)
        body = decode_json(request, ClaimBody) if request.body else ClaimBody()
        run_id = "run_" + secrets.token_hex(10)
        at = now_ms()
        base = self.state.config.public_url
        lease_ms = self._lease_ms()
        return await self._change(
            request,
            principal,
            task_id,
            lambda: Claim(
                app_id=body.app_id or app_id,
                holder=principal.sub,
                run_id=run_id,
                now_ms=at,
                lease_ms=lease_ms,
            ),
            _view(lambda t: claim_view(t, base)),
        )

    async def heartbeat(self, request: Request, task_id: str) -> Response:
        """``POST .../heartbeat``: extend the lease; tells the status and any answer."""
        principal, _ = self._caller(request)
        body = decode_json(request, HeartbeatBody)
        at = now_ms()
        lease_ms = self._lease_ms()
        return await self._change(
            request,
            principal,
            task_id,
            lambda: Heartbeat(
                run_id=body.run_id, now_ms=at, lease_ms=lease_ms, answer_seen=body.answer_seen
            ),
            _view(heartbeat_view),
        )

    async def step(self, request: Request, task_id: str) -> Response:
        """``POST .../steps``: narration for the live UI (``os.harness.step``)."""
        principal, _ = self._caller(request)
        body = decode_json(request, StepBody)
        limit = self.state.config.tasks.max_user_message_bytes
        if len(body.user_message.encode()) > limit:
            raise Refusal(
                "payload_too_large",
                f"user_message exceeds {limit} bytes (tasks.max_user_message_bytes)",
                limit="tasks.max_user_message_bytes",
            )
        at = now_ms()
        return await self._change(
            request,
            principal,
            task_id,
            lambda: Step(
                run_id=body.run_id,
                phase=body.phase,
                user_message=body.user_message,
                internal_label=body.internal_label,
                now_ms=at,
            ),
            _view(run_view),
        )

    async def interrupt(self, request: Request, task_id: str) -> Response:
        """``POST .../interrupt``: park the task with a question; the run stays alive."""
        principal, _ = self._caller(request)
        body = decode_json(request, InterruptBody)
        at = now_ms()
        return await self._change(
            request,
            principal,
            task_id,
            lambda: Interrupt(
                run_id=body.run_id, question=body.question, options=body.options, now_ms=at
            ),
            _view(run_view),
        )

    async def result(self, request: Request, task_id: str) -> Response:
        """``POST .../result``: the ExecutionResult; composes and stores the delivery."""
        principal, _ = self._caller(request)
        body = decode_json(request, ResultBody)
        at = now_ms()
        return await self._change(
            request,
            principal,
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
            _view(result_view),
        )
