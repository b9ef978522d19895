"""Settings of the rater web app (pydantic): database, secret, cookies, size limits.

Built once per process by ``create_app(settings)``; ``from_env()`` reads the same fields from
``PREFLAB_*`` environment variables so that every uvicorn worker process builds an identical app
(the app keeps no state in memory that another worker would need).
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, field_validator


class WebSettings(BaseModel):
    """Everything the web app needs to know; field descriptions double as ``preflab serve`` help."""

    database_url: str = Field("sqlite:///preflab.db", description="SQLAlchemy URL of the store.")
    secret_key: str = Field(..., min_length=16, description="HMAC key for session cookies and CSRF tokens; the same in every worker.")
    project: str = Field("default", description="Project whose raters, prompts and rounds this app serves.")
    cookie_name: str = Field("preflab_session", description="Name of the session cookie.")
    cookie_secure: bool = Field(False, description="Send the session cookie over HTTPS only (set behind TLS).")
    session_max_age_s: int = Field(12 * 3600, gt=0, description="Lifetime of a signed session.")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body accepted (imports included).")
    max_rationale_chars: int = Field(4000, gt=0, description="Longest rationale accepted.")
    max_time_on_task_s: float = Field(3600.0, gt=0, description="Client-measured time on task is clipped to [0, this].")
    lease_s: int = Field(900, gt=0, description="How long an unanswered task stays reserved for its rater.")
    upgrade_db: bool = Field(True, description="Run the store's migrations when the app is built.")

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("database_url: expected a SQLAlchemy URL like sqlite:///preflab.db")
        return v


ENV_PREFIX = "PREFLAB_"


def from_env(environ: dict[str, str] | None = None) -> WebSettings:
    """``WebSettings`` from ``PREFLAB_DATABASE_URL``, ``PREFLAB_SECRET_KEY``, ... (unset -> default)."""
    env = os.environ if environ is None else environ
    data = {}
    for name in WebSettings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            data[name] = env[key]
    return WebSettings(**data)


def to_env(settings: WebSettings) -> dict[str, str]:
    """The ``PREFLAB_*`` variables that make ``from_env()`` rebuild ``settings`` in a worker."""
    out = {}
    for name, value in settings.model_dump().items():
        out[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return out
