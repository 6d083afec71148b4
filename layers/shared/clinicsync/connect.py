"""Connections for operator tools (the ``clinicsync`` CLI): the same adapters the stack uses, built from a
clinic config and its credentials instead of the Lambda environment.

Credentials come from Secrets Manager (the secret a config names) or, before the first deploy, from the
operator's local secrets file; they are held in memory only. OAuth pairs rotated while the CLI works are
written back where they came from (the secret, or the in-memory copy for a file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import boto3
import httpx

from clinicsync.adapters.amocrm import AmoCrmClient
from clinicsync.adapters.amocrm_gateway import AmoCrmGateway
from clinicsync.adapters.amocrm_oauth import AMOCRM, AmoCrmOAuth, AmoCrmTokens
from clinicsync.adapters.amocrm_oauth import SecretsManagerTokenStore as AmoCrmTokenStore
from clinicsync.adapters.bitrix24 import Bitrix24Client, Pacer
from clinicsync.adapters.bitrix24_gateway import Bitrix24Gateway
from clinicsync.adapters.bitrix24_oauth import BITRIX24, Bitrix24OAuth, Bitrix24Tokens
from clinicsync.adapters.bitrix24_oauth import SecretsManagerTokenStore as Bitrix24TokenStore
from clinicsync.adapters.infoclinica import InfoClinicaApi, InfoClinicaSource
from clinicsync.adapters.medods import MedodsApi, MedodsSource
from clinicsync.adapters.renovatio import RenovatioApi, RenovatioSource
from clinicsync.config import ClinicConfig
from clinicsync.oauth import rotated_values
from clinicsync.ports import CrmGateway, MisSource


class MissingCredentials(Exception):
    """A credential the connection needs is not in the secret."""


@dataclass
class Credentials:
    """One system's credentials and where they live (a Secrets Manager id, or None for a local file)."""

    values: dict[str, Any]
    secret_id: str | None = None

    def need(self, *keys: str) -> None:
        missing = [k for k in keys if not self.values.get(k)]
        if missing:
            where = f"secret {self.secret_id!r}" if self.secret_id else "the secrets file"
            raise MissingCredentials(f"{where} has no {', '.join(missing)}")


def read_secret(secret_id: str) -> Credentials:
    text = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id).get("SecretString") or ""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise MissingCredentials(f"secret {secret_id!r} is not a JSON object")
    return Credentials(data, secret_id)


class _MemoryTokens[T]:
    """Tokens from a local secrets file: rotations are kept in memory (the file is the operator's)."""

    def __init__(self, creds: Credentials, vendor: Any) -> None:
        self._creds = creds
        self._vendor = vendor

    def load(self) -> T:
        parsed: T = self._vendor.parse(self._creds.values)
        return parsed

    def save(self, tokens: T) -> None:
        self._creds.values.update(rotated_values(tokens, self._vendor.rotated_keys))


def http_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))


def bitrix24_client(creds: Credentials, http: httpx.Client, rate: float = 2.0, burst: int = 10) -> Bitrix24Client:
    """Paced in-process and kept well under the portal's budget: the live stack shares the same bucket."""
    if creds.values.get("webhook_url"):
        return Bitrix24Client(str(creds.values["webhook_url"]), http=http, pacer=Pacer(rate, burst))
    creds.need("access_token", "refresh_token", "client_endpoint")
    store: Any = (
        Bitrix24TokenStore(boto3.client("secretsmanager"), creds.secret_id)
        if creds.secret_id
        else _MemoryTokens[Bitrix24Tokens](creds, BITRIX24)
    )
    oauth = Bitrix24OAuth(store, http)
    return Bitrix24Client(
        http=http, pacer=Pacer(rate, burst), oauth=oauth, user_id=str(creds.values.get("user_id", ""))
    )


def amocrm_client(creds: Credentials, http: httpx.Client, rate: float = 3.0, burst: int = 1) -> AmoCrmClient:
    creds.need("base_url")
    store: Any = (
        AmoCrmTokenStore(boto3.client("secretsmanager"), creds.secret_id)
        if creds.secret_id
        else _MemoryTokens[AmoCrmTokens](creds, AMOCRM)
    )
    return AmoCrmClient(AmoCrmOAuth(store, http), http, Pacer(rate, burst), max_attempts=3)


def crm_client(kind: str, creds: Credentials, http: httpx.Client) -> Bitrix24Client | AmoCrmClient:
    if kind == "bitrix24":
        return bitrix24_client(creds, http)
    if kind == "amocrm":
        return amocrm_client(creds, http)
    raise NotImplementedError(f"CRM kind {kind!r} has no adapter yet")


def crm_gateway(config: ClinicConfig, client: Bitrix24Client | AmoCrmClient, creds: Credentials) -> CrmGateway:
    if isinstance(client, Bitrix24Client):
        return Bitrix24Gateway(client, config)
    return AmoCrmGateway(client, config, str(creds.values.get("user_id", "")))


def medods_api(base_url: str, creds: Credentials, http: httpx.Client) -> MedodsApi:
    creds.need("identity_key", "secret")
    return MedodsApi(
        base_url, str(creds.values["identity_key"]), str(creds.values["secret"]), http=http, max_attempts=2
    )


def mis_source(config: ClinicConfig, creds: Credentials, http: httpx.Client) -> MisSource:
    kind = config.mis.kind
    if kind == "medods":
        return MedodsSource(medods_api(config.mis.base_url, creds, http), config)
    if kind == "infoclinica":
        return InfoClinicaSource(InfoClinicaApi.from_secret(config.mis.base_url, creds.values, tz=config.tz), config)
    if kind == "renovatio":
        return RenovatioSource(RenovatioApi.from_secret(config.mis.base_url, creds.values, http=http), config)
    raise NotImplementedError(
        f"MIS kind {kind!r} cannot be read from here"
        + (" (IDENT pushes through its connector at the clinic)" if kind == "ident" else "")
    )
