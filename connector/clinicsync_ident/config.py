"""The connector's config file (YAML), written once at the clinic by ``clinicsync-ident init``.

The signing key is kept in its own file (readable only by the service account), never in this one, so
the config can be shown to support without leaking it. The clinic's filters, time zone and no-show
grace are not here: the connector fetches them from the stack, so they live only in the clinic config.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, field_validator


class DatabaseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    driver: Literal["mssql", "sqlite"] = "mssql"
    dsn: str = Field(
        min_length=1,
        description="pyodbc connection string, e.g. DRIVER={ODBC Driver 18 for SQL Server};SERVER=.\\PZSQLSERVER;"
        "DATABASE=PZ;Trusted_Connection=yes;Encrypt=yes;TrustServerCertificate=yes (sqlite: a file path)",
    )


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    connector_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Names this install in batch ids")
    stack_url: HttpUrl = Field(description="The clinic stack's HTTP API, e.g. https://abc123.execute-api...")
    key_file: Path = Field(description="File holding the signing key (the MIS secret's connector_key)")
    state_file: Path = Field(description="Where the cursor is kept between runs (survives restarts)")
    database: DatabaseSettings
    interval_seconds: int = Field(default=60, ge=10, le=3600)
    first_sync_days: int = Field(default=90, ge=1, le=3650, description="How far back the very first run reads")
    overlap_seconds: int = Field(default=120, ge=0, le=3600, description="Re-read this much before the cursor")
    patients_per_batch: int = Field(default=100, ge=1, le=500)
    ca_bundle: Path | None = Field(default=None, description="Extra CA bundle, if the clinic's proxy re-signs TLS")

    @field_validator("stack_url")
    @classmethod
    def _tls_only(cls, url: HttpUrl) -> HttpUrl:
        # Batches carry patients' names and phones: plain http only to this machine (the local runtime).
        if url.scheme != "https" and not _loopback(url.host or ""):
            raise ValueError("stack_url must be https:// (http only for a loopback address)")
        return url

    def signing_key(self) -> bytes:
        key = self.key_file.read_text(encoding="utf-8").strip().encode()
        if len(key) < 32:
            raise ValueError(f"{self.key_file}: the signing key must be at least 32 characters")
        return key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (0600 from the first byte, no window at 0644)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def load_config(path: Path) -> ConnectorConfig:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return ConnectorConfig.model_validate(data)
