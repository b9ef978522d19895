"""Typed dependencies of the routes: settings, store access, the signed-in user, CSRF.

Authentication is either ``Authorization: Bearer <API token>`` (scripts; no cookie is looked
at, so no CSRF applies) or the signed session cookie (pages and their fetch calls; every
unsafe method must then carry the CSRF token as header ``X-CSRF-Token`` or form field
``csrf_token``). Every request re-reads the rater from the store, so deactivating a rater or
changing a role takes effect at once in every worker, and new credentials end the sessions
signed in with the old ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request, Response

from preflab.web import security as sec
from preflab.web.errors import WebError
from preflab.web.settings import WebSettings

T = TypeVar("T")
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
STATUS_OF = {"invalid": 400, "not_found": 404, "conflict": 409, "forbidden": 403}


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    project_id: int


def get_settings(request: Request) -> WebSettings:
    return request.app.state.settings


def run_store(request: Request, fn: Callable[..., T], *, readonly: bool = False) -> T:
    """Run ``fn(session)`` in one transaction (retried on deadlock); StoreError -> 4xx WebError.

    The transaction has committed when this returns, so a 2xx built from its result is durable.
    """
    from preflab.store import db
    from preflab.store.ops import StoreError

    engine = request.app.state.engine
    try:
        if readonly:
            with db.session_scope(engine, readonly=True) as s:
                return fn(s)
        return db.transact(engine, fn)
    except StoreError as e:  # the store's "invalid" is the API's "invalid_input", as for a malformed request
        raise WebError(STATUS_OF.get(e.code, 400), "invalid_input" if e.code == "invalid" else e.code, str(e)) from None


def project_id(request: Request) -> int:
    return request.app.state.project_id


def read_cookie_session(request: Request) -> sec.Session | None:
    s: WebSettings = request.app.state.settings
    return sec.read_session(request.cookies.get(s.cookie_name), s.secret_key)


def signed_in_session(request: Request, rater_id: int) -> sec.Session:
    """A fresh session for ``rater_id``, bound to the rater's current credentials."""
    from preflab.store import ops

    settings: WebSettings = request.app.state.settings
    version = run_store(request, lambda s: ops.credentials_version(s, rater_id=rater_id), readonly=True)
    return sec.new_session(rater_id, settings.session_max_age_s,
                           stamp=sec.credentials_stamp(version, settings.secret_key))


def set_session_cookie(response: Response, session: sec.Session, settings: WebSettings) -> None:
    response.set_cookie(settings.cookie_name, sec.sign_session(session, settings.secret_key),
                        max_age=settings.session_max_age_s, httponly=True, samesite="lax",
                        secure=settings.cookie_secure, path="/")


def bearer_token(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth is None:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise WebError(401, "unauthenticated", "Authorization: expected 'Bearer <API token>'")
    return token.strip()


async def csrf_guard(request: Request) -> None:
    """Unsafe methods authenticated by cookie must carry the session's CSRF token."""
    if request.method not in UNSAFE or "authorization" in request.headers:
        return
    settings: WebSettings = request.app.state.settings
    session = read_cookie_session(request)
    if session is None:  # no session (or an expired one) to forge a request for: say so, as a GET would
        raise WebError(401, "unauthenticated", "sign in first (session cookie missing or expired)")
    supplied = request.headers.get("x-csrf-token")
    ctype = request.headers.get("content-type", "")
    if supplied is None and (ctype.startswith("application/x-www-form-urlencoded")
                             or ctype.startswith("multipart/form-data")):
        try:
            form = await request.form()  # cached by Starlette: the route reads the same form
        except Exception:
            raise WebError(400, "invalid_input", "form: could not parse the request body") from None
        value = form.get("csrf_token")
        supplied = value if isinstance(value, str) else None
    if not sec.check_csrf(session, settings.secret_key, supplied):
        raise WebError(403, "csrf", "csrf_token: missing or invalid (reload the page and try again)")


def current_user(request: Request) -> User:
    """The signed-in rater (API token or session cookie), re-read from the store; else 401."""
    from preflab.store import ops

    token = bearer_token(request)
    pid = project_id(request)
    if token is not None:
        info = run_store(request, lambda s: ops.rater_by_token(s, token=token), readonly=True)
        if info is None or info.project_id != pid:
            raise WebError(401, "unauthenticated", "Authorization: unknown or revoked API token")
    else:
        sess = read_cookie_session(request)
        if sess is None or sess.rater_id is None:
            raise WebError(401, "unauthenticated", "sign in first (session cookie missing or expired)")

        def load(s):  # noqa: ANN001, ANN202
            from preflab.store.ops import StoreError

            try:
                return ops.get_rater(s, rater_id=sess.rater_id), ops.credentials_version(s, rater_id=sess.rater_id)
            except StoreError:
                return None, ""

        info, version = run_store(request, load, readonly=True)
        if info is None or not info.active or info.project_id != pid:
            raise WebError(401, "unauthenticated", "sign in again (this account is no longer active)")
        if not sec.session_matches(sess, version, request.app.state.settings.secret_key):
            raise WebError(401, "unauthenticated", "sign in again (this account has new credentials)")
    return User(id=info.id, name=info.name, role=info.role, project_id=info.project_id)


def admin_user(user: Annotated[User, Depends(current_user)]) -> User:
    if user.role != "admin":
        raise WebError(403, "forbidden", "this page needs the admin role")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
AdminUser = Annotated[User, Depends(admin_user)]
Settings = Annotated[WebSettings, Depends(get_settings)]
