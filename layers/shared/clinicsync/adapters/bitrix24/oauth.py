"""OAuth 2.0 for Bitrix24 local and Marketplace apps: the token pair, where it lives, and its rotation.

Calls go to ``client_endpoint + method`` with ``auth=<access token>``. The access token lives an hour;
on ``401 expired_token`` the client refreshes **once** and replays. Every refresh returns a new refresh
token and kills the old one. The refresh algorithm (one refresh per expiry under a lock, the new pair
saved before use, recovery when another container refreshed) is :class:`clinicsync.adapters.http.oauth.OAuthSession`;
this module is the Bitrix24 part of it:

* :class:`Bitrix24Tokens`, the OAuth keys of the CRM secret JSON, and the keys a rotation rewrites;
* the grant: ``GET {oauth server}/oauth/token/?grant_type=refresh_token&client_id=…&client_secret=…
  &refresh_token=…`` (the secrets travel in the query string; the ``httpx`` log filter installed by
  :mod:`clinicsync.adapters.http.oauth` masks them);
* the names the Bitrix24 client and the wiring use (``Bitrix24OAuth``, the strategy ``BITRIX24`` that
  parametrises :class:`clinicsync.adapters.http.oauth.SecretsManagerTokenStore` and
  :func:`clinicsync.adapters.http.oauth.lease_lock`,
  ``Bitrix24AuthError`` = :class:`clinicsync.adapters.http.oauth.OAuthError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from clinicsync.adapters.http.oauth import (
    LockFactory,
    OAuthError,
    OAuthSession,
    TokenStore,
    json_object,
    parse_model,
    rotated_values,
    send_token_request,
)
from clinicsync.adapters.http.redaction import scrub

__all__ = [
    "DEFAULT_SERVER_ENDPOINT",
    "ROTATED_KEYS",
    "Bitrix24AuthError",
    "Bitrix24OAuth",
    "Bitrix24Tokens",
    "Bitrix24Vendor",
    "LockFactory",
    "TokenStore",
    "parse_tokens",
]

VENDOR = "bitrix24"
DEFAULT_SERVER_ENDPOINT = "https://oauth.bitrix.info/rest/"
# Keys of the CRM secret JSON that a refresh rewrites; every other key is left as it was.
ROTATED_KEYS = ("access_token", "refresh_token", "expires", "client_endpoint", "server_endpoint")

# One error type for every OAuth failure, whichever module raised it (lock, store, session, grant).
Bitrix24AuthError = OAuthError


class Bitrix24Tokens(BaseModel):
    """The OAuth part of the clinic's CRM secret JSON (other keys of that JSON are ignored here)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    access_token: SecretStr
    refresh_token: SecretStr
    expires: int = Field(default=0, description="unix time the access token expires; 0 = unknown")
    client_endpoint: str = Field(min_length=1, description="portal REST base, e.g. https://x.bitrix24.ru/rest/")
    server_endpoint: str = Field(default=DEFAULT_SERVER_ENDPOINT, description="OAuth server, from the token reply")
    oauth_url: str | None = Field(default=None, description="explicit OAuth server base; wins over server_endpoint")
    member_id: str = ""
    client_id: str = Field(min_length=1)
    client_secret: SecretStr

    @property
    def token_url(self) -> str:
        """``…/oauth/token/`` on the OAuth server: ``oauth_url`` if set, else the host of ``server_endpoint``
        (a Russian-zone portal answers with oauth.bitrix24.tech, so the host is never hard-coded)."""
        if self.oauth_url:
            base = self.oauth_url.rstrip("/")
            return base + "/" if base.endswith("/oauth/token") else base + "/oauth/token/"
        parts = urlsplit(self.server_endpoint)
        return urlunsplit((parts.scheme or "https", parts.netloc, "/oauth/token/", "", ""))

    def rotated_values(self) -> dict[str, Any]:
        """The plain values a refresh changes, as they are stored in the secret JSON."""
        return rotated_values(self, ROTATED_KEYS)


def parse_tokens(data: Mapping[str, Any]) -> Bitrix24Tokens:
    """Validate the secret JSON; errors name the fields only (pydantic would echo the input, tokens included)."""
    return parse_model(Bitrix24Tokens, data, VENDOR)


class Bitrix24Vendor:
    """The Bitrix24 strategy for :class:`clinicsync.adapters.http.oauth.OAuthSession`."""

    name = VENDOR
    rotated_keys = ROTATED_KEYS

    def parse(self, data: Mapping[str, Any]) -> Bitrix24Tokens:
        return parse_tokens(data)

    def grant(self, stored: Bitrix24Tokens, http: httpx.Client, now: float) -> Bitrix24Tokens:
        params = {
            "grant_type": "refresh_token",
            "client_id": stored.client_id,
            "client_secret": stored.client_secret.get_secret_value(),
            "refresh_token": stored.refresh_token.get_secret_value(),
        }
        secrets = [params["client_secret"], params["refresh_token"], stored.access_token.get_secret_value()]
        response = send_token_request(http, http.build_request("GET", stored.token_url, params=params), VENDOR)
        body = json_object(response, VENDOR)
        if response.status_code != 200 or "error" in body:
            code = str(body.get("error") or f"HTTP_{response.status_code}")
            description = scrub(str(body.get("error_description", "")), secrets)[:200]
            raise OAuthError(code, description, response.status_code, vendor=VENDOR)
        try:
            expires = int(body.get("expires") or now + int(body.get("expires_in", 0)))
            return stored.model_copy(
                update={
                    "access_token": SecretStr(str(body["access_token"])),
                    "refresh_token": SecretStr(str(body["refresh_token"])),
                    "expires": expires,
                    "client_endpoint": str(body.get("client_endpoint") or stored.client_endpoint),
                    "server_endpoint": str(body.get("server_endpoint") or stored.server_endpoint),
                }
            )
        except (KeyError, TypeError, ValueError):
            raise OAuthError(
                "bad_response", "token reply lacks access_token/refresh_token", 200, vendor=VENDOR
            ) from None


BITRIX24 = Bitrix24Vendor()


class Bitrix24OAuth(OAuthSession[Bitrix24Tokens]):
    """Hands out the current access token and rotates the pair when the portal says it expired."""

    def __init__(
        self,
        store: TokenStore[Bitrix24Tokens],
        http: httpx.Client,
        lock: LockFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(BITRIX24, store, http, lock=lock, clock=clock)

    def client_endpoint(self) -> str:
        """Portal REST base URL ending in ``/`` (calls go to ``client_endpoint + method``)."""
        endpoint = self.tokens().client_endpoint
        return endpoint if endpoint.endswith("/") else endpoint + "/"
