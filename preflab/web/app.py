"""The rater web app, built (never imported as a global): ``create_app(settings) -> FastAPI``.

Pages (server-rendered Jinja2 + a little vanilla JS) for raters and admins, and a JSON API
under ``/api/v1`` with an OpenAPI schema for everything the pages do. All state lives in the
store; the app object holds only the settings, an engine and the templates, so any number of
worker processes can serve the same database.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from preflab.web.errors import install_handlers
from preflab.web.settings import WebSettings, from_env

HERE = Path(__file__).resolve().parent


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 before any route reads them."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(scope, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        import json

        body = json.dumps({"error": {"code": "too_large",
                                     "message": f"request body: larger than the limit of {self.limit} bytes"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # no framing: a hidden frame could capture a rater's key presses
    (b"referrer-policy", b"same-origin"),
    # scripts and styles from this origin only (inline style attributes draw the progress bars)
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
     b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
]


class SecurityHeaders:
    """Add ``SECURITY_HEADERS`` to every response (pure ASGI: no per-request task overhead)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        # Swagger UI (/api/docs) loads its script from a CDN and inlines its setup: no CSP there
        skip = {b"content-security-policy"} if scope["path"] == "/api/docs" else set()

        async def with_headers(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                names = {k.lower() for k, _ in msg.get("headers", [])} | skip
                msg["headers"] = list(msg.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in names]
            await send(msg)

        await self.app(scope, receive, with_headers)


def create_app(settings: WebSettings) -> FastAPI:
    """A FastAPI app serving ``settings.project`` from ``settings.database_url``."""
    from preflab import __version__
    from preflab.store import db
    from preflab.web.routes import admin, api, pages

    if settings.upgrade_db:
        db.upgrade(settings.database_url)
    app = FastAPI(title="preflab rater API", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/v1/openapi.json")
    app.state.settings = settings
    app.state.engine = db.make_engine(settings.database_url)
    app.state.project_id = _project_id(app.state.engine, settings.project)
    # templates are read once: a package upgraded under a running server must not pair new templates with old code
    app.state.templates = Jinja2Templates(directory=str(HERE / "templates"))
    # a round's agreement per (round, judgement count, newest judgement): routes.api.round_agreement
    app.state.agreement_cache = (threading.Lock(), OrderedDict())
    app.state.templates.env.auto_reload = False
    install_handlers(app)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    return app


def _project_id(engine, name: str) -> int:  # noqa: ANN001
    """The served project's id (created if missing; a race with another worker is retried)."""
    from sqlalchemy.exc import IntegrityError

    from preflab.store import db, ops

    for _ in range(3):
        try:
            return db.transact(engine, lambda s: ops.ensure_project(s, name=name))
        except IntegrityError:
            continue
    return db.transact(engine, lambda s: ops.ensure_project(s, name=name))


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: every worker rebuilds the app from ``PREFLAB_*``."""
    return create_app(from_env())
