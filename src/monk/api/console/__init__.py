"""The web console at /console: server-rendered pages (Jinja2), live parts polled with htmx,
every asset shipped in the package. Routes parse, call the service, render; every action is
the service call the JSON API makes."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from monk.api.auth import verify_root
from monk.api.console import charts
from monk.api.deps import runtime
from monk.api.public import scrubbed
from monk.api.runtime import Runtime
from monk.core.lifecycle import TenantStatus
from monk.errors import InvalidRequest, LoginThrottled, MonkError, table_entry
from monk.service import console as console_service
from monk.service import host_templates, role_pool
from monk.service.console import ConsoleSession as Session

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent
PAGE_SIZE = 50
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/console", include_in_schema=False)
COOKIE = "monk_console"


class NoSession(Exception):
    """No valid session: a page sends the browser to sign in, anything else gets 401."""


class BadCsrf(Exception):
    pass


def mount(app: FastAPI) -> None:
    app.state.console_builds = {}
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(router)
    app.add_exception_handler(NoSession, _no_session)
    app.add_exception_handler(BadCsrf, _bad_csrf)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console", status_code=307)


def _no_session(request: Request, exc: Exception) -> Response:
    fragment = request.url.path.startswith("/console/fragment/") or (
        "fragment" in request.query_params
    )
    if request.method == "GET" and not fragment and "hx-request" not in request.headers:
        return RedirectResponse("/console/login", status_code=303)
    # htmx follows HX-Redirect: a live fragment whose session ended sends its page to sign in
    return Response("sign in first", status_code=401, headers={"HX-Redirect": "/console/login"})


def _bad_csrf(request: Request, exc: Exception) -> Response:
    return Response(
        "refused: the form's CSRF token does not match this session (reload the page)",
        status_code=403,
    )


def session(request: Request) -> Session:
    rt: Runtime = request.app.state.runtime
    found = console_service.find_session(rt.tenants, request.cookies.get(COOKIE))
    if found is None:
        raise NoSession
    return found


async def checked_session(request: Request) -> Session:
    """The session of an action, whose form (or htmx header) carries its CSRF token."""
    found = await run_in_threadpool(session, request)
    given = request.headers.get("x-csrf-token")
    if given is None:
        form = await request.form()
        value = form.get("csrf")
        given = value if isinstance(value, str) else None
    if not console_service.csrf_ok(found, given):
        raise BadCsrf
    return found


Rt = Annotated[Runtime, Depends(runtime)]
Sess = Annotated[Session, Depends(session)]
Action = Annotated[Session, Depends(checked_session)]


def _render(
    request: Request, name: str, sess: Session | None, status_code: int = 200, **context: Any
) -> HTMLResponse:
    context |= {"session": sess, "path": request.url.path}
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _error(exc: MonkError) -> tuple[int, str]:
    status, _exit = table_entry(type(exc))
    return status, f"{exc.code}: {exc.message}"


# ---------------------------------------------------------------- sign-in


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, rt: Rt) -> HTMLResponse:
    return _render(request, "login.html", None, users=bool(rt.settings.console_users))


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    rt: Rt,
    token: Annotated[str, Form()] = "",
    user: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
) -> Response:
    who: str | None = None
    if token:
        try:
            verify_root(token.strip(), rt.secret)
            who = "root token"
        except MonkError:
            who = None
    elif user:
        try:
            if console_service.sign_in_operator(rt.tenants, rt.login_policy, user, password):
                who = user
        except LoginThrottled as exc:
            page = _render(
                request,
                "login.html",
                None,
                status_code=429,
                users=bool(rt.settings.console_users),
                error=exc.message,
            )
            page.headers["Retry-After"] = str(exc.retry_after or 1)
            return page
    if who is None:
        return _render(
            request,
            "login.html",
            None,
            status_code=401,
            users=bool(rt.settings.console_users),
            error="sign-in failed: wrong token, user or password",
        )
    new = console_service.open_session(rt.tenants, who)
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(
        COOKIE,
        new.id,
        max_age=rt.settings.console_session_ttl,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(request: Request, rt: Rt, sess: Action) -> Response:
    console_service.close_session(rt.tenants, sess.id)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# ---------------------------------------------------------------- overview


def _overview_context(rt: Runtime) -> dict[str, Any]:
    ov = console_service.overview(rt.tenants)
    targets = rt.settings.pool_spares
    spares = [
        (key, ov.spares_ready.get(key, 0), targets.get(key, 0))
        for key in sorted(set(targets) | set(ov.spares_ready))
    ]
    return {
        "ov": ov,
        "chart": charts.hour(ov),
        "spares": spares,
        # Per host, as 'monk pool status' shows them (spare roles are made on each host).
        "spare_roles": role_pool.status(rt.tenants),
        "total": sum(ov.by_status.values()),
        "recent": console_service.tenant_page(rt.tenants, sort="created", descending=True, limit=8)[
            0
        ],
    }


@router.get("", response_class=HTMLResponse)
def overview(request: Request, rt: Rt, sess: Sess) -> HTMLResponse:
    return _render(request, "overview.html", sess, **_overview_context(rt))


@router.get("/fragment/overview", response_class=HTMLResponse)
def overview_fragment(request: Request, rt: Rt, sess: Sess) -> HTMLResponse:
    return _render(request, "_overview.html", sess, **_overview_context(rt))


# ---------------------------------------------------------------- tenants


ListQuery = Annotated[str, Query(max_length=200)]


@dataclass(frozen=True)
class ListView:
    """What the tenants table shows: its search, filters, order and page (the query string)."""

    q: str = ""
    status: str = ""
    template: str = ""
    host: str = ""
    sort: str = "created"
    desc: bool = True
    page: int = 1


def list_view(
    q: ListQuery = "",
    status: ListQuery = "",
    template: ListQuery = "",
    host: ListQuery = "",
    sort: ListQuery = "created",
    order: Literal["asc", "desc"] = "desc",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> ListView:
    return ListView(q, status, template, host, sort, order == "desc", page)


View = Annotated[ListView, Depends(list_view)]


def _list_context(rt: Runtime, v: ListView) -> dict[str, Any]:
    rows, total = console_service.tenant_page(
        rt.tenants,
        search=v.q.strip(),
        status=v.status,
        template=v.template,
        host=v.host,
        sort=v.sort,
        descending=v.desc,
        limit=PAGE_SIZE,
        offset=(v.page - 1) * PAGE_SIZE,
    )
    pages = max(1, -(-total // PAGE_SIZE))
    filters = {"q": v.q, "status": v.status, "template": v.template, "host": v.host}
    current = {**filters, "sort": v.sort, "order": "desc" if v.desc else "asc", "page": v.page}

    def link(**changes: Any) -> str:
        params = current | changes
        return "/console/tenants?" + urlencode({k: val for k, val in params.items() if val})

    return {
        "rows": rows,
        "total": total,
        "page": v.page,
        "pages": pages,
        "sort": v.sort,
        "desc": v.desc,
        "link": link,
        "filters": filters,
        "fragment_query": urlencode(current),
    }


def _list_page(
    request: Request, rt: Runtime, sess: Session, v: ListView, status_code: int = 200, **extra: Any
) -> HTMLResponse:
    templates_, hosts = console_service.filter_choices(rt.tenants)
    return _render(
        request,
        "tenants.html",
        sess,
        status_code=status_code,
        statuses=[s.value for s in TenantStatus if s.value != "deleted"],
        templates_=templates_,
        hosts=hosts,
        **extra,
        **_list_context(rt, v),
    )


@router.get("/tenants", response_class=HTMLResponse)
def tenants(request: Request, rt: Rt, sess: Sess, v: View, done: ListQuery = "") -> HTMLResponse:
    return _list_page(request, rt, sess, v, done=done)


@router.get("/fragment/tenants", response_class=HTMLResponse)
def tenants_fragment(request: Request, rt: Rt, sess: Sess, v: View) -> HTMLResponse:
    return _render(request, "_tenants.html", sess, **_list_context(rt, v))


def _tenant_page(
    request: Request,
    rt: Runtime,
    sess: Session,
    name: str,
    *,
    status_code: int = 200,
    **extra: Any,
) -> HTMLResponse:
    try:
        view = rt.tenants.view(rt.tenants.get(name))
        detail = console_service.tenant_detail(rt.tenants, name)
    except MonkError as exc:
        code, message = _error(exc)
        return _render(request, "error.html", sess, status_code=code, error=message, **extra)
    data = view.as_dict()
    if data.get("archive"):
        data["archive"] = scrubbed(rt.settings, data["archive"])
    return _render(
        request,
        "tenant.html",
        sess,
        status_code=status_code,
        t=data,
        detail=detail,
        **extra,
    )


@router.get("/tenants/{name}", response_class=HTMLResponse)
def tenant(request: Request, rt: Rt, sess: Sess, name: str, done: str = "") -> HTMLResponse:
    return _tenant_page(request, rt, sess, name, done=done[:100])


@router.post("/tenants", response_class=HTMLResponse)
def provision(
    request: Request,
    rt: Rt,
    sess: Action,
    name: Annotated[str, Form(max_length=200)],
    template: Annotated[str, Form(max_length=200)],
    host: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    try:
        view = rt.provision(name, template=template.strip(), host=host.strip() or None)
    except MonkError as exc:
        code, message = _error(exc)
        return _list_page(
            request,
            rt,
            sess,
            ListView(),
            status_code=code,
            error=message,
            form={"name": name, "template": template, "host": host},
        )
    # The new tenant's URL and root password, shown once on the page this answer renders.
    return _tenant_page(request, rt, sess, view.tenant.name, created=view.as_dict())


_ACTIONS = ("disable", "enable", "trash", "restore", "purge", "rotate")


@router.post("/tenants/{name}/{action}", response_class=HTMLResponse)
def act(
    request: Request,
    rt: Rt,
    sess: Action,
    name: str,
    action: str,
    confirm: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    try:
        if action == "disable":
            rt.tenants.disable(name)
        elif action == "enable":
            rt.tenants.enable(name)
        elif action == "trash":
            rt.tenants.trash(name)
        elif action == "restore":
            rt.tenants.restore(name)
        elif action == "purge":
            if confirm.strip() != name:
                raise InvalidRequest(
                    f"purge not started: type the tenant's name {name!r} to confirm"
                )
            rt.request_purge(name, archive=True, forget=False)
            return RedirectResponse(
                "/console/tenants?" + urlencode({"done": f"purge of {name} queued"}),
                status_code=303,
            )
        elif action == "rotate":
            view = rt.tenants.rotate_credentials(name)
            return _tenant_page(request, rt, sess, name, rotated=view.as_dict())
        else:
            raise InvalidRequest(f"unknown action {action!r}: one of {', '.join(_ACTIONS)}")
    except MonkError as exc:
        code, message = _error(exc)
        return _tenant_page(request, rt, sess, name, status_code=code, error=message)
    return RedirectResponse(
        f"/console/tenants/{name}?" + urlencode({"done": f"{action}: done"}), status_code=303
    )


# ---------------------------------------------------------------- templates


@dataclass
class BuildLog:
    """A build the console started: its steps as they come, then its outcome."""

    key: str
    steps: list[str] = field(default_factory=list)
    outcome: str | None = None
    failed: bool = False


def _builds_started(request: Request) -> dict[str, BuildLog]:
    logs: dict[str, BuildLog] = request.app.state.console_builds
    return logs


def _start_build(request: Request, rt: Runtime, key: str) -> None:
    """Build ``key`` on every host on a thread of its own, as ``POST /api/root/template/{key}``
    does; the templates page follows its steps live."""
    log = BuildLog(key)
    _builds_started(request)[key] = log

    def step(host: str, name: str) -> None:
        log.steps.append(f"{host}: {name}")

    def build() -> None:
        try:
            answers = host_templates.build_everywhere(rt.tenants, key, progress=step)
            local = answers[0]
            if local.error is not None:
                rt.metrics.template_builds.labels(result=local.error.code).inc()
                raise local.error
            assert local.result is not None
            built = local.result.built
            rt.metrics.template_builds.labels(result="ok" if built else "up_to_date").inc()
            version = local.result.build.version[:12]
            log.outcome = f"built {version}" if built else f"up to date ({version})"
        except MonkError as exc:
            log.outcome, log.failed = f"failed: {_error(exc)[1]}", True
        except Exception:
            logger.exception("console build of %s failed", key)
            log.outcome, log.failed = "failed: internal error (see the server's log)", True

    threading.Thread(target=build, name=f"monk-console-build-{key}", daemon=True).start()


@router.get("/templates", response_class=HTMLResponse)
def templates_page(request: Request, rt: Rt, sess: Sess, done: str = "") -> HTMLResponse:
    return _render(
        request,
        "templates.html",
        sess,
        builds=console_service.builds(rt.tenants),
        started=_builds_started(request),
        done=done[:200],
    )


@router.get("/fragment/templates", response_class=HTMLResponse)
def templates_fragment(request: Request, rt: Rt, sess: Sess) -> HTMLResponse:
    return _render(
        request,
        "_templates.html",
        sess,
        builds=console_service.builds(rt.tenants),
        started=_builds_started(request),
    )


@router.post("/templates/{key}/{action}", response_class=HTMLResponse)
def template_action(request: Request, rt: Rt, sess: Action, key: str, action: str) -> Response:
    try:
        if action == "build":
            _start_build(request, rt, key)
            done = f"build of {key} started"
        elif action == "check":
            report = rt.tenants.templates.check(key)
            done = f"check of {key}: " + ", ".join(
                f"{k}={v}" for k, v in report.as_dict().items() if not isinstance(v, list | dict)
            )
        elif action == "prune":
            dropped = rt.tenants.templates.prune(key)
            done = f"prune of {key}: {len(dropped)} build(s) dropped"
        else:
            raise InvalidRequest(f"unknown action {action!r}: one of build, check, prune")
    except MonkError as exc:
        code, message = _error(exc)
        return _render(
            request,
            "templates.html",
            sess,
            status_code=code,
            builds=console_service.builds(rt.tenants),
            started=_builds_started(request),
            error=message,
        )
    return RedirectResponse("/console/templates?" + urlencode({"done": done}), status_code=303)


# ---------------------------------------------------------------- journal and events


@router.get("/operations", response_class=HTMLResponse)
def operations_page(
    request: Request,
    rt: Rt,
    sess: Sess,
    kind: ListQuery = "",
    state: ListQuery = "",
    subject: ListQuery = "",
    fragment: bool = False,
) -> HTMLResponse:
    rows = console_service.operations_page(
        rt.tenants, kind=kind, state=state, subject=subject.strip().casefold()
    )
    for row in rows:
        row["error"] = scrubbed(rt.settings, row["error"])
    query = urlencode({"kind": kind, "state": state, "subject": subject, "fragment": 1})
    name = "_operations.html" if fragment else "operations.html"
    return _render(
        request,
        name,
        sess,
        rows=rows,
        filters={"kind": kind, "state": state, "subject": subject},
        fragment_query=query,
    )


@router.get("/events", response_class=HTMLResponse)
def events_page(
    request: Request,
    rt: Rt,
    sess: Sess,
    kind: ListQuery = "",
    undelivered: bool = False,
    fragment: bool = False,
) -> HTMLResponse:
    rows = console_service.events_page(rt.tenants, kind=kind, undelivered=undelivered)
    query = urlencode({"kind": kind, "undelivered": "1" if undelivered else "", "fragment": 1})
    name = "_events.html" if fragment else "events.html"
    return _render(
        request,
        name,
        sess,
        rows=rows,
        filters={"kind": kind, "undelivered": undelivered},
        fragment_query=query,
    )
