"""OAuth 2.0 for amoCRM (and Kommo): the token pair or long-lived token, where it lives, and its rotation.

API calls go to ``{base_url}/api/v4/…`` with ``Authorization: Bearer <access token>``, where ``base_url``
is the account's own ``https://{subdomain}.amocrm.ru`` (``.kommo.com`` …), taken from the secret. Two
kinds of credentials, both kept in the clinic's CRM secret JSON:

* **OAuth** (``access_token`` + ``refresh_token``): the access token is a JWT living ``expires_in``
  seconds (24 h today). On 401 the client refreshes **once** with
  ``POST {base_url}/oauth2/access_token`` and the JSON body
  ``{client_id, client_secret, grant_type: "refresh_token", refresh_token, redirect_uri}``.
  Refresh tokens are **single-use**: a spent one is refused with HTTP 400 (sometimes 401)
  ``OAuthProblemJson`` ``{"hint": "Token has been revoked", …}``, which the session treats as
  ``invalid_grant`` (re-read the store: another container may have refreshed). The algorithm (one
  refresh per expiry under a lock, new pair saved before use) is :class:`clinicsync.adapters.http.oauth.OAuthSession`.
* **Long-lived token** (private integrations; ``long_lived_token``, or an ``access_token`` without a
  ``refresh_token``): nothing to refresh. When amoCRM refuses it, :meth:`AmoCrmOAuth.refresh` uses a
  different token an operator has since put in the secret, else raises the non-retryable
  ``long_lived_token_rejected``; the token endpoint is never called.

Other keys of the secret (``account_id``, ``webhook_secret``, ``user_id`` …) are never rewritten.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from clinicsync.adapters.amocrm.client import ACCOUNT_BLOCKED
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
from clinicsync.observability import logger

__all__ = [
    "ROTATED_KEYS",
    "AmoCrmAuthError",
    "AmoCrmOAuth",
    "AmoCrmTokens",
    "AmoCrmVendor",
    "jwt_expiry",
    "parse_tokens",
]

VENDOR = "amocrm"
TOKEN_PATH = "/oauth2/access_token"  # noqa: S105 (a URL path, not a secret)
# Keys of the CRM secret JSON that a refresh rewrites; every other key is left as it was.
ROTATED_KEYS = ("access_token", "refresh_token", "expires")
# Words of an OAuthProblemJson ``hint`` that blame the client credentials rather than the refresh token.
_CLIENT_HINTS = ("client authentication", "client_id", "client_secret", "invalid client")

AmoCrmAuthError = OAuthError


def jwt_expiry(token: str) -> int:
    """The ``exp`` claim of a JWT, read without verifying the signature (0 if it is not a JWT with one)."""
    parts = token.split(".")
    if len(parts) != 3:
        return 0
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are all ValueErrors
        return 0
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) and exp > 0 else 0


class AmoCrmTokens(BaseModel):
    """The auth part of the clinic's CRM secret JSON (other keys of that JSON are ignored here).

    A ``long_lived_token`` key wins over an OAuth pair and becomes ``access_token`` with no
    ``refresh_token``. ``expires`` defaults to the access token's JWT ``exp``.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    base_url: str = Field(min_length=1, description="the account, e.g. https://clinic.amocrm.ru")
    access_token: SecretStr
    refresh_token: SecretStr | None = Field(default=None, description="None: a long-lived token")
    expires: int = Field(default=0, description="unix time the access token expires; 0 = unknown")
    client_id: str = ""
    client_secret: SecretStr | None = None
    redirect_uri: str = ""

    @model_validator(mode="before")
    @classmethod
    def _long_lived_and_expiry(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        values = {k: v for k, v in data.items() if v not in ("", None)}  # a blanked key counts as absent
        long_lived = values.pop("long_lived_token", None)
        if long_lived is not None:
            values["access_token"] = long_lived
            values.pop("refresh_token", None)
            values.pop("expires", None)  # the stored expiry, if any, belongs to the OAuth pair
        access = values.get("access_token")
        if not values.get("expires") and isinstance(access, str):
            values["expires"] = jwt_expiry(access)
        return values

    @field_validator("base_url")
    @classmethod
    def _account_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("base_url must be the account URL, https://{subdomain}.amocrm.ru")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _refresh_needs_the_app(self) -> AmoCrmTokens:
        if self.refresh_token is not None:
            missing = [
                key
                for key, value in (
                    ("client_id", self.client_id),
                    ("client_secret", self.client_secret and self.client_secret.get_secret_value()),
                    ("redirect_uri", self.redirect_uri),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"a refresh_token needs {', '.join(missing)}")
        return self

    @property
    def long_lived(self) -> bool:
        return self.refresh_token is None

    @property
    def token_url(self) -> str:
        return self.base_url + TOKEN_PATH

    def rotated_values(self) -> dict[str, Any]:
        """The plain values a refresh changes, as they are stored in the secret JSON."""
        return rotated_values(self, ROTATED_KEYS)


def parse_tokens(data: Mapping[str, Any]) -> AmoCrmTokens:
    """Validate the secret JSON; errors name the fields only (pydantic would echo the input, tokens included)."""
    return parse_model(AmoCrmTokens, data, VENDOR)


class AmoCrmVendor:
    """The amoCRM strategy for :class:`clinicsync.adapters.http.oauth.OAuthSession`."""

    name = VENDOR
    rotated_keys = ROTATED_KEYS

    def parse(self, data: Mapping[str, Any]) -> AmoCrmTokens:
        return parse_tokens(data)

    def grant(self, stored: AmoCrmTokens, http: httpx.Client, now: float) -> AmoCrmTokens:
        if stored.refresh_token is None:
            raise _long_lived_rejected()  # AmoCrmOAuth never gets here; never call the endpoint regardless
        if stored.client_secret is None:  # parse_tokens rules this out; kept for the type checker
            raise OAuthError("invalid_secret", "a refresh_token needs client_secret", vendor=VENDOR)
        body = {
            "client_id": stored.client_id,
            "client_secret": stored.client_secret.get_secret_value(),
            "grant_type": "refresh_token",
            "refresh_token": stored.refresh_token.get_secret_value(),
            "redirect_uri": stored.redirect_uri,
        }
        secrets = [body["client_secret"], body["refresh_token"], stored.access_token.get_secret_value()]
        response = send_token_request(http, http.build_request("POST", stored.token_url, json=body), VENDOR)
        if response.status_code != 200:
            raise _refused(response, secrets)
        reply = json_object(response, VENDOR)
        access, refresh = reply.get("access_token"), reply.get("refresh_token")
        if not isinstance(access, str) or not access or not isinstance(refresh, str) or not refresh:
            raise OAuthError("bad_response", "token reply lacks access_token/refresh_token", 200, vendor=VENDOR)
        try:
            lifetime = int(reply.get("expires_in") or 0)
        except (TypeError, ValueError):
            lifetime = 0
        expires = int(now) + lifetime if lifetime > 0 else jwt_expiry(access)
        return stored.model_copy(
            update={"access_token": SecretStr(access), "refresh_token": SecretStr(refresh), "expires": expires}
        )


def _refused(response: httpx.Response, secrets: list[str]) -> OAuthError:
    """An OAuthProblemJson (or anything else) from the token endpoint as an :class:`OAuthError`.

    A spent refresh token ("Token has been revoked", "Invalid refresh token" …) comes back as 400 or
    401: both are ``invalid_grant``, unless the hint blames the client credentials (``invalid_client``).
    403 (an nginx HTML page) is a blocked account (amocrm-api-php #563), ``account_blocked``: the pair
    was not rotated, so the stored tokens stay valid for when the block is lifted.
    """
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    problem: dict[str, Any] = body if isinstance(body, dict) else {}
    text = next((str(problem[k]) for k in ("hint", "detail", "title") if problem.get(k)), "")
    description = scrub(text, secrets)[:200]
    error = problem.get("error")
    if isinstance(error, str) and error:
        return OAuthError(error, description, status, vendor=VENDOR)
    if status in (400, 401):
        code = "invalid_client" if any(h in text.lower() for h in _CLIENT_HINTS) else "invalid_grant"
        return OAuthError(code, description, status, vendor=VENDOR)
    if status == 429:
        return OAuthError("rate_limited", description, status, retryable=True, vendor=VENDOR)
    if status == 403:
        blocked = "amoCRM blocked the account or integration (repeated rate-limit violations); tokens kept"
        return OAuthError(ACCOUNT_BLOCKED, blocked, status, vendor=VENDOR)
    # 5xx: usually nothing was rotated and a retry works. If a gateway hid a rotation (a 504 after the
    # grant ran), the retry ends in a plain invalid_grant, which is the truth by then.
    return OAuthError(f"HTTP_{status}", description, status, retryable=status >= 500, vendor=VENDOR)


def _long_lived_rejected() -> OAuthError:
    return OAuthError(
        "long_lived_token_rejected",
        "amoCRM refused the long-lived token (expired or revoked) and it cannot be refreshed; generate a new "
        "one in the private integration's 'Keys and scopes' and store it as long_lived_token in the CRM secret",
        vendor=VENDOR,
    )


AMOCRM = AmoCrmVendor()


class AmoCrmOAuth(OAuthSession[AmoCrmTokens]):
    """The amoCRM client's auth: the current access token, the account URL, one refresh per expiry."""

    def __init__(
        self,
        store: TokenStore[AmoCrmTokens],
        http: httpx.Client,
        lock: LockFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(AMOCRM, store, http, lock=lock, clock=clock)

    def base_url(self) -> str:
        """The account's ``https://{subdomain}.amocrm.ru`` without a trailing slash."""
        return self.tokens().base_url

    @property
    def long_lived(self) -> bool:
        """True when the secret holds a long-lived token: :meth:`refresh` never calls the token endpoint."""
        return self.tokens().long_lived

    def refresh(self, stale_access_token: str) -> str:
        """Called after amoCRM answered 401 to ``stale_access_token``; returns the token to replay with.

        OAuth: see :meth:`clinicsync.adapters.http.oauth.OAuthSession.refresh`. Long-lived token: the store is read
        once; a different token an operator has put there since is used, else
        ``long_lived_token_rejected`` (not retryable) is raised.
        """
        known = self._unsaved if self._unsaved is not None else self._tokens  # no load, no pending save
        if not (known.long_lived if known is not None else self.long_lived):
            return super().refresh(stale_access_token)
        stored = self._store.load()
        if self._moved_on(stored, stale_access_token):
            logger.info("amocrm oauth long-lived token replaced in the store", extra={"expires": stored.expires})
            self._remember(stored)
            return stored.access_token.get_secret_value()
        if not stored.long_lived:  # the secret was switched to an OAuth pair meanwhile
            self._remember(stored)
            return super().refresh(stale_access_token)
        logger.error("amocrm oauth long-lived token rejected", extra={"expires": stored.expires})
        raise _long_lived_rejected()
