"""A short digest of a feed row, for cursors that must tell a same-second re-edit from a re-read."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def row_digest(row: Any) -> str:
    """12 hex characters of the row's SHA-256: not reversible to the row's content, and it changes with it."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:12]
