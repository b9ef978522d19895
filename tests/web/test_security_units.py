"""Units of preflab.web.security: hashing, signed sessions, CSRF tokens."""

from __future__ import annotations

from preflab.web import security as sec

SECRET = "s" * 32


def test_password_hash_is_argon2_and_verifies():
    h = sec.hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    assert sec.verify_password(h, "correct horse")
    assert not sec.verify_password(h, "wrong")
    assert not sec.verify_password("not-a-hash", "x")
    assert not sec.verify_password(None, "x")


def test_token_hash_is_sha256_of_token():
    t = sec.new_token()
    assert t.startswith("pl_") and len(t) > 40
    assert sec.hash_token(t) == sec.hash_token(t) and len(sec.hash_token(t)) == 64
    assert sec.hash_token(t) != sec.hash_token(sec.new_token())
    # a known vector: sha256("abc")
    assert sec.hash_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_session_roundtrip_and_tamper():
    s = sec.new_session(7, 100, now=1000.0)
    c = sec.sign_session(s, SECRET)
    assert sec.read_session(c, SECRET, now=1050.0) == sec.Session(7, s.nonce, float(int(s.expires)))
    assert sec.read_session(c, SECRET, now=1101.0) is None  # expired
    assert sec.read_session(c, "t" * 32, now=1050.0) is None  # other key
    body, sig = c.split(".")
    forged = sec.sign_session(sec.Session(1, s.nonce, s.expires), "t" * 32).split(".")[0] + "." + sig
    assert sec.read_session(forged, SECRET, now=1050.0) is None  # payload swapped
    for junk in ("", "abc", "a.b", ".", "x" * 5000, None):
        assert sec.read_session(junk, SECRET) is None


def test_session_bound_to_the_credentials_it_signed_in_with():
    stamp = sec.credentials_stamp("version-1", SECRET)
    s = sec.read_session(sec.sign_session(sec.new_session(7, 100, stamp=stamp, now=1000.0), SECRET), SECRET, now=1050.0)
    assert s.stamp == stamp and sec.session_matches(s, "version-1", SECRET)
    assert not sec.session_matches(s, "version-2", SECRET)  # new password or token: signed out
    assert not sec.session_matches(s, "version-1", "t" * 32)  # the stamp is keyed
    assert "version-1" not in stamp and len(stamp) == 22
    legacy = sec.Session(7, s.nonce, s.expires)  # a cookie from before stamps: signs in again
    assert not sec.session_matches(legacy, "version-1", SECRET)


def test_csrf_bound_to_session_nonce():
    a, b = sec.new_session(1, 100), sec.new_session(1, 100)
    ta = sec.csrf_token(a, SECRET)
    assert sec.check_csrf(a, SECRET, ta)
    assert not sec.check_csrf(b, SECRET, ta)
    assert not sec.check_csrf(a, SECRET, "")
    assert not sec.check_csrf(None, SECRET, ta)
