"""AWS sessions per cell: each cell is an account (and region); a role is assumed where one is given."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config

from clinicsync_cli.fleet.registry import Cell

# Throttled control-plane calls back off and retry instead of failing the rollout.
CLIENT_CONFIG = Config(retries={"mode": "adaptive", "max_attempts": 10}, max_pool_connections=64)


class CachingSession(boto3.Session):
    """Builds each client once (clients are thread-safe; building one costs ~50 ms of CPU) and each
    resource once per thread (resources are not thread-safe)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def client(self, service_name: str, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return super().client(service_name, *args, **kwargs)  # type: ignore[call-overload]
        with self._lock:
            if service_name not in self._clients:
                self._clients[service_name] = super().client(service_name, config=CLIENT_CONFIG)  # type: ignore[call-overload]
            return self._clients[service_name]

    def resource(self, service_name: str, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return super().resource(service_name, *args, **kwargs)  # type: ignore[call-overload]
        cache: dict[str, Any] = self._local.__dict__.setdefault("resources", {})
        if service_name not in cache:
            with self._lock:  # building from one session is not thread-safe
                cache[service_name] = super().resource(service_name, config=CLIENT_CONFIG)  # type: ignore[call-overload]
        return cache[service_name]


class Cells:
    def __init__(self, cells: dict[str, Cell]) -> None:
        self._cells = cells
        self._sessions: dict[str, CachingSession] = {}
        self._lock = threading.Lock()
        self._bind_lock = threading.Lock()
        self._bound = 0
        self._previous: boto3.Session | None = None

    def cell(self, name: str) -> Cell:
        return self._cells[name]

    def session(self, name: str) -> CachingSession:
        with self._lock:
            if name not in self._sessions:
                self._sessions[name] = _open(self._cells[name])
            return self._sessions[name]

    def client(self, name: str, service: str) -> Any:
        return self.session(name).client(service)

    @contextlib.contextmanager
    def bound(self, name: str) -> Iterator[None]:
        """Run the single-clinic pieces (``clinicsync deploy``'s secrets/config step, ``status``'s reads),
        which use boto3's default session, against this cell's session. With one cell, every thread
        shares it (bound once, released by the last thread); with several, one caller at a time."""
        if len(self._cells) == 1:
            with self._bind_lock:
                if self._bound == 0:
                    self._previous, boto3.DEFAULT_SESSION = boto3.DEFAULT_SESSION, self.session(name)
                self._bound += 1
            try:
                yield
            finally:
                with self._bind_lock:
                    self._bound -= 1
                    if self._bound == 0:
                        boto3.DEFAULT_SESSION = self._previous
            return
        with _exclusive:
            previous, boto3.DEFAULT_SESSION = boto3.DEFAULT_SESSION, self.session(name)
            try:
                yield
            finally:
                boto3.DEFAULT_SESSION = previous


_exclusive = threading.RLock()


def _open(cell: Cell) -> CachingSession:
    if cell.role_arn is None:
        return CachingSession(region_name=cell.region)
    sts = boto3.client("sts", region_name=cell.region)
    creds = sts.assume_role(RoleArn=cell.role_arn, RoleSessionName="clinicsync-fleet")["Credentials"]
    return CachingSession(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
        region_name=cell.region,
    )
