"""Passwords, API tokens, signed session cookies and CSRF tokens (stdlib HMAC + argon2).

- Passwords: argon2id (``argon2-cffi``), only the hash is stored.
- API tokens: 32 random bytes; stored as SHA-256 hex (a high-entropy token needs no slow hash,
  and a plain digest can be looked up by index).
- Session cookie: ``base64url(json payload) "." base64url(HMAC-SHA256(secret, payload))``,
  payload ``{"r": rater_id | null, "n": nonce, "e": expiry, "c": stamp}``. Stateless, so any
  worker process verifies it. Sent HttpOnly + SameSite=Lax. The stamp is
  ``HMAC(secret, "cred:" + credentials version)`` of the rater's password and token at sign-in:
  new credentials (an admin's "New password", ``store reset-password``) end every session signed
  in with the old ones.
- CSRF: synchroniser token ``HMAC(secret, "csrf:" + nonce)`` bound to the session nonce; every form
  post and every cookie-authenticated unsafe API call must carry it (form field ``csrf_token`` or
  header ``X-CSRF-Token``). Bearer-token calls carry no cookie and need none.
- Flash: the admin pages' one-time message after a post (post/redirect/get), a new rater's
  password included: encrypted with an HMAC-SHA256 pad under a random nonce and signed, in a
  60-second HttpOnly cookie scoped to /admin, deleted when shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """argon2id hash of ``password`` (salted; the only thing stored)."""
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored_hash``; False on mismatch or a malformed hash."""
    if not stored_hash:
        return False
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_token() -> str:
    """A fresh API token (shown once, never stored in clear)."""
    return "pl_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 hex digest of an API token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, msg: bytes) -> bytes:
    return hmac.new(secret.encode(), msg, hashlib.sha256).digest()


@dataclass(frozen=True)
class Session:
    rater_id: int | None
    nonce: str
    expires: float
    stamp: str = ""


def credentials_stamp(version: str, secret: str) -> str:
    """What a session cookie carries of the rater's credentials version (keyed, so it reveals nothing)."""
    return _b64(_mac(secret, b"cred:" + version.encode()))[:22]


def new_session(rater_id: int | None, max_age_s: int, *, stamp: str = "", now: float | None = None) -> Session:
    """A session with a fresh nonce (rotated at sign-in so a pre-login token is useless after)."""
    now = time.time() if now is None else now
    return Session(rater_id=rater_id, nonce=secrets.token_urlsafe(16), expires=now + max_age_s, stamp=stamp)


def session_matches(session: Session, version: str, secret: str) -> bool:
    """Whether the session was signed in with the rater's current credentials."""
    return hmac.compare_digest(session.stamp, credentials_stamp(version, secret))


def sign_session(session: Session, secret: str) -> str:
    payload = json.dumps({"r": session.rater_id, "n": session.nonce, "e": int(session.expires),
                          "c": session.stamp}, separators=(",", ":")).encode()
    return _b64(payload) + "." + _b64(_mac(secret, payload))


def read_session(cookie: str | None, secret: str, *, now: float | None = None) -> Session | None:
    """The session in a signed cookie, or None if absent, tampered with, malformed or expired."""
    if not cookie or "." not in cookie or len(cookie) > 4096:
        return None
    body, sig = cookie.rsplit(".", 1)
    try:
        payload = _unb64(body)
        if not hmac.compare_digest(_unb64(sig), _mac(secret, payload)):
            return None
        data = json.loads(payload)
        s = Session(rater_id=data["r"], nonce=str(data["n"]), expires=float(data["e"]), stamp=str(data.get("c", "")))
    except (ValueError, KeyError, TypeError):
        return None
    if s.rater_id is not None and not isinstance(s.rater_id, int):
        return None
    if s.expires < (time.time() if now is None else now):
        return None
    return s


def csrf_token(session: Session, secret: str) -> str:
    """The CSRF token bound to this session's nonce."""
    return _b64(_mac(secret, b"csrf:" + session.nonce.encode()))


def check_csrf(session: Session | None, secret: str, supplied: str | None) -> bool:
    if session is None or not supplied:
        return False
    return hmac.compare_digest(csrf_token(session, secret), supplied)


def _keystream(secret: str, nonce: bytes, n: int) -> bytes:
    """HMAC-SHA256 in counter mode: a pseudorandom pad of ``n`` bytes for this nonce."""
    out = b"".join(_mac(secret, b"flash-pad:" + nonce + i.to_bytes(4, "big")) for i in range(n // 32 + 1))
    return out[:n]


def sign_flash(message: str, secret: str) -> str:
    """A one-time message carried by a cookie across a post's redirect: encrypted (a new password
    can ride in it) with an HMAC-SHA256 pad under a random nonce, then signed (encrypt-then-MAC)."""
    nonce = secrets.token_bytes(16)
    plain = message.encode()
    sealed = nonce + bytes(a ^ b for a, b in zip(plain, _keystream(secret, nonce, len(plain)), strict=True))
    return _b64(sealed) + "." + _b64(_mac(secret, b"flash:" + sealed))


def read_flash(cookie: str | None, secret: str) -> str | None:
    """The message of a flash cookie, or None if absent, tampered with or malformed."""
    if not cookie or "." not in cookie or len(cookie) > 4096:
        return None
    body, sig = cookie.rsplit(".", 1)
    try:
        sealed = _unb64(body)
        if len(sealed) < 16 or not hmac.compare_digest(_unb64(sig), _mac(secret, b"flash:" + sealed)):
            return None
        nonce, cipher = sealed[:16], sealed[16:]
        return bytes(a ^ b for a, b in zip(cipher, _keystream(secret, nonce, len(cipher)), strict=True)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
