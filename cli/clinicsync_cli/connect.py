"""Connections for operator tools (the ``clinicsync`` CLI): the same adapters the stack uses, built from a
clinic config and its credentials instead of the Lambda environment.

Credentials come from Secrets Manager (the secret a config names) or, before the first deploy, from the
operator's local secrets file. An OAuth pair rotated while the CLI works goes through the one token-writer
path (:class:`clinicsync.adapters.http.oauth.OAuthSession`: refresh under the lease, persist before use)
into the store it
came from: the secret (under the stack's DynamoDB lease when the stack exists), or the secrets file, which is
then the only copy of the live pair.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import yaml

from clinicsync.adapters.amocrm.client import AmoCrmClient
from clinicsync.adapters.amocrm.gateway import AmoCrmGateway
from clinicsync.adapters.amocrm.oauth import AMOCRM, AmoCrmOAuth
from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway
from clinicsync.adapters.bitrix24.oauth import BITRIX24, Bitrix24OAuth
from clinicsync.adapters.http.oauth import SecretsManagerTokenStore, lease_lock, rotated_values
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.adapters.infoclinica.api import InfoClinicaApi
from clinicsync.adapters.infoclinica.source import InfoClinicaSource
from clinicsync.adapters.medods.source import MedodsApi, MedodsSource
from clinicsync.adapters.renovatio.source import RenovatioApi, RenovatioSource
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import CrmGateway
from clinicsync.domain.ports import MisSource
from clinicsync.domain.store_ports import Leases


def token_keys(kind: str) -> tuple[str, ...]:
    """The keys of a CRM secret that belong to its OAuth pair (what a refresh rewrites)."""
    return {"amocrm": AMOCRM.rotated_keys, "bitrix24": BITRIX24.rotated_keys}.get(kind, ())


class MissingCredentials(Exception):
    """A credential the connection needs is not in the secret."""


@dataclass
class Credentials:
    """One system's credentials and where they live (a Secrets Manager id, or None for a local file)."""

    values: dict[str, Any]
    secret_id: str | None = None
    # The operator's secrets file these came from, and the object in it (``crm``): rotations are written back.
    source_file: Path | None = None
    section: str = "crm"

    def need(self, *keys: str) -> None:
        missing = [k for k in keys if not self.values.get(k)]
        if missing:
            where = f"secret {self.secret_id!r}" if self.secret_id else "the secrets file"
            raise MissingCredentials(f"{where} has no {', '.join(missing)}")


def read_secret(secret_id: str, region: str | None = None) -> Credentials:
    text = boto3.client("secretsmanager", region_name=region).get_secret_value(SecretId=secret_id).get("SecretString")
    text = text or ""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise MissingCredentials(f"secret {secret_id!r} is not a JSON object")
    return Credentials(data, secret_id)


class FileTokens[T]:
    """Tokens from the operator's secrets file (no secret in AWS yet). A rotated pair is written back to
    the file before it is used: the vendor has already killed the old refresh token, so the file must not
    keep it (the first deploy copies the file's pair into the secret)."""

    def __init__(self, creds: Credentials, vendor: Any) -> None:
        self._creds = creds
        self._vendor = vendor

    def load(self) -> T:
        parsed: T = self._vendor.parse(self._creds.values)
        return parsed

    def save(self, tokens: T) -> None:
        rotated = rotated_values(tokens, self._vendor.rotated_keys)
        path = self._creds.source_file
        if path is not None:
            write_secrets_file(path, self._creds.section, rotated)
        self._creds.values.update(rotated)


def write_secrets_file(path: Path, section: str, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into one object of a secrets file, atomically and readable by its owner only."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise MissingCredentials(f"{path} is not a mapping")
    data[section] = {**(data.get(section) or {}), **updates}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def http_client() -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))


def _token_store(creds: Credentials, vendor: Any, region: str | None) -> Any:
    if creds.secret_id:
        return SecretsManagerTokenStore(boto3.client("secretsmanager", region_name=region), creds.secret_id, vendor)
    return FileTokens[Any](creds, vendor)


def bitrix24_client(
    creds: Credentials,
    http: httpx.Client,
    rate: float = 2.0,
    burst: int = 10,
    *,
    leases: Leases | None = None,
    region: str | None = None,
) -> Bitrix24Client:
    """Paced in-process and kept well under the portal's budget: the live stack shares the same bucket.
    ``leases``: the stack's table, so a refresh here is serialised with the stack's own (same lease)."""
    if creds.values.get("webhook_url"):
        return Bitrix24Client(str(creds.values["webhook_url"]), http=http, pacer=Pacer(rate, burst))
    creds.need("access_token", "refresh_token", "client_endpoint")
    lock = lease_lock(leases, BITRIX24) if leases is not None else None
    oauth = Bitrix24OAuth(_token_store(creds, BITRIX24, region), http, lock=lock)
    return Bitrix24Client(
        http=http, pacer=Pacer(rate, burst), oauth=oauth, user_id=str(creds.values.get("user_id", ""))
    )


def amocrm_client(
    creds: Credentials,
    http: httpx.Client,
    rate: float = 3.0,
    burst: int = 1,
    *,
    leases: Leases | None = None,
    region: str | None = None,
) -> AmoCrmClient:
    creds.need("base_url")
    lock = lease_lock(leases, AMOCRM) if leases is not None else None
    auth = AmoCrmOAuth(_token_store(creds, AMOCRM, region), http, lock=lock)
    return AmoCrmClient(auth, http, Pacer(rate, burst), max_attempts=3)


def crm_client(
    kind: str,
    creds: Credentials,
    http: httpx.Client,
    *,
    leases: Leases | None = None,
    region: str | None = None,
) -> Bitrix24Client | AmoCrmClient:
    if kind == "bitrix24":
        return bitrix24_client(creds, http, leases=leases, region=region)
    if kind == "amocrm":
        return amocrm_client(creds, http, leases=leases, region=region)
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
