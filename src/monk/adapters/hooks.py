"""Webhooks: POST one event to one observer URL, signed.

The body is the event as JSON; headers name it (``Monk-Event-Id``, ``Monk-Event-Type``) and,
when the hook has a secret, sign it: ``Monk-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
Any 2xx is success; anything else (status, timeout, refused connection) is a failure described
in one line, for the outbox to retry.
"""

from __future__ import annotations

import hashlib
import hmac

import httpx

USER_AGENT = "monk-hooks/1"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(
    url: str,
    body: bytes,
    *,
    event_id: str,
    event_type: str,
    secret: str | None,
    timeout: float,
) -> str | None:
    """Deliver; None on success, else what went wrong."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Monk-Event-Id": event_id,
        "Monk-Event-Type": event_type,
    }
    if secret:
        headers["Monk-Signature"] = signature(secret, body)
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}: {response.text[:200]}"
