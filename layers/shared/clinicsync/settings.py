"""The Lambda environment, read in this one module: names and ARNs of the stack's resources, never values.

Secrets come from Secrets Manager and the clinic config from SSM (see ``wiring``); the template sets every
variable below, and a missing or empty one fails the container at start instead of at the first use.
"""

from __future__ import annotations

import os

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    clinic_id: str = Field(min_length=1)
    table_name: str = Field(min_length=1)
    sync_queue_url: str = Field(min_length=1)
    crm_event_queue_url: str = Field(min_length=1)
    consent_queue_url: str = Field(min_length=1)
    config_parameter_name: str = Field(min_length=1)
    mis_secret_arn: str = Field(min_length=1)
    crm_secret_arn: str = Field(min_length=1)
    clinic_secret_arn: str = Field(min_length=1)
    ident_inbox_queue_url: str = Field(min_length=1)
    # The stage syncer tells its three event sources apart by these (never by a queue's name).
    sync_queue_arn: str = Field(min_length=1)
    crm_event_queue_arn: str = Field(min_length=1)
    consent_queue_arn: str = Field(min_length=1)

    @classmethod
    def from_env(cls) -> Settings:
        return cls()


def current_clinic_id() -> str:
    """The clinic of this invocation, for the metric dimension: read per call, not cached, because the local
    runtime runs several clinics in one process."""
    return os.environ.get("CLINIC_ID", "")
