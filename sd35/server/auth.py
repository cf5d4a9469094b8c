"""Who may call a protected server: one check for every route and the ComfyUI websocket.

Credentials are ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``, as some ComfyUI and Open WebUI
clients send it), or A1111's HTTP basic ``--api-auth`` credentials. A browser's websocket cannot set
headers, so the websocket also takes the key as the ``token`` query parameter.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping

from sd35.server.settings import ServerSettings

TOKEN_PARAM = "token"


def _same(given: str, wanted: str) -> bool:
    return hmac.compare_digest(given.encode(), wanted.encode())


def authorized(settings: ServerSettings, headers: Mapping[str, str], token: str | None = None) -> bool:
    """Whether ``headers`` (or the websocket's ``token``) carry this server's credentials."""
    key = settings.api_key
    if key is not None:
        for given in (headers.get("x-api-key"), token):
            if given and _same(given, key):
                return True
    scheme, _, credentials = (headers.get("authorization") or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and key is not None:
        return _same(credentials, key)
    if scheme.lower() == "basic" and settings.api_auth is not None:
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except ValueError:
            return False
        want_user, want_password = settings.api_auth
        return _same(user, want_user) & _same(password, want_password)
    return False
