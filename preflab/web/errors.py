"""One error type and one handler that renders it as JSON (API, scripts) or HTML (pages).

Every failure a client can cause ends here as a 4xx with a message that names the place
(``rationale: at least 20 characters``); unexpected exceptions become a bare 500 without
internals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("preflab.web")


class WebError(Exception):
    """A client-visible error: HTTP status, a short machine code and a message naming the place."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def wants_json(request: Request) -> bool:
    if request.url.path.startswith("/api/"):
        return True
    accept = request.headers.get("accept", "")
    return "application/json" in accept and "text/html" not in accept


def render_error(request: Request, status: int, code: str, message: str) -> Response:
    if wants_json(request):
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)
    if status == 401:
        return RedirectResponse("/login?next=" + request.url.path, status_code=303)
    templates = request.app.state.templates
    # a link back to the page that sent the request (same site only): the browser's back keeps the form's input
    ref = request.headers.get("referer", "")
    back = ref if ref.startswith(str(request.base_url)) else None
    if back and back.split("?")[0] == str(request.url).split("?")[0]:  # a form posted to the page it was shown at
        parent = request.url.path.rstrip("/").rsplit("/", 1)[0]  # (/admin/raters): its page is the parent (/admin)
        back = str(request.base_url).rstrip("/") + parent if parent and request.method == "POST" else None
    user, csrf = _signed_in(request) if status != 500 else (None, None)
    return templates.TemplateResponse(request, "error.html", {"status": status, "code": code, "message": message,
                                                              "user": user, "csrf_token": csrf, "back": back},
                                      status_code=status)


def _signed_in(request: Request):  # noqa: ANN202
    """The signed-in user and CSRF token for the error page's navigation, or (None, None) if not known."""
    from preflab.web import security as sec
    from preflab.web.deps import current_user, read_cookie_session

    try:
        sess = read_cookie_session(request)
        if sess is None or sess.rater_id is None:
            return None, None
        return current_user(request), sec.csrf_token(sess, request.app.state.settings.secret_key)
    except Exception:  # an error page must render even when the store cannot be read  # noqa: BLE001
        return None, None


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) or str(loc[0] if loc else "request")


def _message(request: Request, e: dict) -> str:
    """One validation error as "place: what is wrong", with the JSON position or the missing header said."""
    loc = tuple(e.get("loc", ()))
    if e.get("type") == "json_invalid":  # loc is ("body", character offset)
        at = loc[1] if len(loc) > 1 else "?"
        return f"body: invalid JSON at character {at} ({(e.get('ctx') or {}).get('error', 'decode error')})"
    msg = f"{_loc(loc)}: {e.get('msg', 'invalid')}"
    if loc == ("body",) and "json" not in request.headers.get("content-type", ""):
        msg += " (send the body as JSON with Content-Type: application/json)"
    return msg


def install_handlers(app: FastAPI) -> None:
    """Register the single handler for WebError, validation errors, HTTP errors and the rest."""

    @app.exception_handler(WebError)
    async def _web_error(request: Request, exc: WebError) -> Response:
        return render_error(request, exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errs = exc.errors()
        msgs = [_message(request, e) for e in errs[:5]]
        return render_error(request, 422, "invalid_input", "; ".join(msgs) or "invalid input")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return render_error(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render_error(request, 500, "internal_error", "internal error (logged on the server)")
