"""The connector's config file (YAML), written once at the clinic by ``clinicsync-ident init``.

The signing key is kept in its own file (readable only by the service account), never in this one, so
the config can be shown to support without leaking it. The clinic's filters, time zone and no-show
grace are not here: the connector fetches them from the stack, so they live only in the clinic config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, HttpUrl


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

    def signing_key(self) -> bytes:
        key = self.key_file.read_text(encoding="utf-8").strip().encode()
        if len(key) < 32:
            raise ValueError(f"{self.key_file}: the signing key must be at least 32 characters")
        return key


def load_config(path: Path) -> ConnectorConfig:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping")
    return ConnectorConfig.model_validate(data)
