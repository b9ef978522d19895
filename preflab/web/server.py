"""``preflab serve``: migrate, create the first admin, then run uvicorn with N workers.

Migrations and the first admin happen once in the parent process; the workers rebuild the
app from ``PREFLAB_*`` environment variables (``app.app_from_env``) and share nothing else.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

from preflab.web.settings import WebSettings, to_env


def bootstrap(settings: WebSettings, *, admin_name: str = "admin") -> tuple[str, str, str] | None:
    """Migrate the store, ensure the project, and create an admin if it has none.

    Returns ``(name, password, api_token)`` of a newly created admin (shown once), else None.
    """
    from preflab.store import db, ops

    db.upgrade(settings.database_url)
    engine = db.make_engine(settings.database_url)
    try:
        def setup(s):  # noqa: ANN001, ANN202
            pid = ops.ensure_project(s, name=settings.project)
            if any(r.role == "admin" for r in ops.list_raters(s, project_id=pid)):
                return None
            name = admin_name
            if ops.rater_by_name(s, project_id=pid, name=name) is not None:
                name = f"{admin_name}-{secrets.token_hex(3)}"
            password = secrets.token_urlsafe(12)
            rid = ops.create_rater(s, project_id=pid, name=name, password=password, role="admin")
            return name, password, ops.issue_api_token(s, rater_id=rid)

        made = db.transact(engine, setup)
    finally:
        engine.dispose()
    return made


def _check_port(host: str, port: int) -> None:
    """``ValueError`` naming ``--port`` when ``host:port`` cannot be bound (another server has it)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ValueError(f"--port: cannot listen on {host}:{port} ({e.strerror or e}); is another server "
                             "running there? Stop it or choose another --port") from None


def serve(*, db_url: str, host: str, port: int, workers: int, project: str, secret_key: str | None,
          cookie_secure: bool = False, echo: Callable[[str], None] = print) -> None:
    """Bootstrap, print the URL (and first-start credentials once), then block in uvicorn."""
    import uvicorn

    from preflab.store.db import normalise_url

    _check_port(host, port)  # before anything is created: a port in use must not cost a first admin's credentials
    generated = secret_key is None
    settings = WebSettings(database_url=normalise_url(db_url), secret_key=secrets.token_urlsafe(32) if generated else secret_key,
                           project=project, cookie_secure=cookie_secure, upgrade_db=False)
    made = bootstrap(settings)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    echo(f"preflab serving project {project!r} from {settings.database_url.split('@')[-1]} "
         f"at http://{shown}:{port}/ ({workers} worker{'s' if workers > 1 else ''})")
    if made is not None:
        name, password, token = made
        echo(f"first start: created admin {name!r} (shown once, store them now)")
        echo(f"  admin name: {name}")
        echo(f"  admin password: {password}")
        echo(f"  admin API token: {token}")
    if generated:
        echo("note: no --secret-key / PREFLAB_SECRET_KEY given: sessions end when the server restarts")
    os.environ.update(to_env(settings))
    uvicorn.run("preflab.web.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level="warning", access_log=False, timeout_graceful_shutdown=5)
