"""The connector's own cursor, in a small JSON file replaced atomically, so a crash or a reboot in the
middle of a run leaves either the old cursor or the new one, never a torn file."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ConnectorState(BaseModel):
    model_config = ConfigDict(extra="ignore")

    changed_since: datetime | None = None  # clinic-local, as IDENT stores DateTimeChanged
    no_show_checked_until: datetime | None = None  # bookings due before this were swept
    settings: dict[str, Any] | None = None  # the stack's last answer, used when it is unreachable
    # Versions sent inside the overlap window ("P#id"/"A#id" -> version): a re-read is not re-sent.
    recent: dict[str, int] = Field(default_factory=dict)
    batches_sent: int = 0


def load_state(path: Path) -> ConnectorState:
    if not path.exists():
        return ConnectorState()
    return ConnectorState.model_validate_json(path.read_text(encoding="utf-8"))


def save_state(path: Path, state: ConnectorState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(state.model_dump(mode="json"), ensure_ascii=False, indent=2))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
