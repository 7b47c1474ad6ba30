"""Where the durable store lives and how to reach it: URLs, engines, errors, migrations.

`sqlite:///path` runs on aiosqlite, `postgresql://user@host/db` on asyncpg; a `+driver`
given explicitly is kept. The URL's password is a secret: every message shows the URL
with `***` in its place. A new database gets the schema on first use; an embedded SQLite
store is also upgraded in place; a PostgreSQL one that is behind asks for
`metering db upgrade`; a database newer than this code is refused.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import ipaddress
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from metering_core.errors import (
    AuthenticationError,
    ConfigurationError,
    MeteringError,
    ProviderUnavailableError,
    ValidationError,
)
from metering_core.models import EXACT
from metering_core.sql.checkpoints import WRITER_CHECKPOINT_PAGES
from metering_core.sql.driver import mark_pooled
from metering_core.sql.settings import masked

__all__ = [
    "StoreBounds",
    "StoreUrl",
    "canonical_dimensions",
    "migrate",
    "rolled_back",
    "schema_revisions",
    "store_error",
]

ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


@dataclass(frozen=True)
class StoreBounds:
    """How long a store call may wait, in seconds (the sql provider's settings)."""

    connect: float
    statement: float | None  # None: unbounded (a migration, which may take long)
    pool: float


def _one(value: str | tuple[str, ...] | None) -> str | None:
    """A query parameter's value (the first, if given more than once)."""
    return value[0] if isinstance(value, tuple) else value


def _local(host: str) -> bool:
    """Whether `host` names this machine: none, localhost, a loopback address, or a
    unix socket's folder."""
    if host in ("", "localhost") or host.startswith("/"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class StoreUrl:
    """A store's URL: the async driver chosen, and a form safe to print."""

    def __init__(self, url: str) -> None:
        refusal = ConfigurationError(
            f"url={masked(url)!r} is not a database URL: expected sqlite:///path or "
            "postgresql://user:password@host:port/db (percent-encode '@', '/' or ':' in "
            "the password)"
        )
        if url.partition("://")[2].split("/", 1)[0].count("@") > 1:
            raise refusal
        try:
            parsed = make_url(url)
            parsed.port  # noqa: B018  # a port that is not a number fails here
        except (sa.exc.ArgumentError, ValueError):
            raise refusal from None
        if any(key.lower() == "password" for key in parsed.query):
            raise ConfigurationError(
                f"url={masked(url)!r}: give the password before the host, not as a parameter"
            )
        backend = parsed.get_backend_name()
        if backend not in ASYNC_DRIVERS:
            raise ConfigurationError(
                f"url={parsed.render_as_string()!r}: the sql provider takes sqlite or "
                f"postgresql URLs, not {backend!r}"
            )
        if "+" not in parsed.drivername:
            parsed = parsed.set(drivername=ASYNC_DRIVERS[backend])
        self.url: URL = parsed
        self.backend = backend

    @property
    def shown(self) -> str:
        """The URL with its password masked."""
        return self.url.render_as_string(hide_password=True)

    @property
    def sqlite_path(self) -> Path | None:
        database = self.url.database
        if self.backend != "sqlite" or not database or database == ":memory:":
            return None
        return Path(database)

    def same_store(self, other: StoreUrl) -> bool:
        """Whether `other` names this store: the same SQLite file (a link to it too), or
        the same database of the same PostgreSQL server, as far as the URLs tell (a
        loopback name, or none, is one host)."""
        if self.backend != other.backend:
            return False
        if self.backend == "sqlite":
            mine, theirs = self.sqlite_path, other.sqlite_path
            if mine is None or theirs is None:
                return False
            if mine.exists() and theirs.exists():
                return os.path.samefile(mine, theirs)
            return mine.resolve() == theirs.resolve()
        return self._server_database() == other._server_database()

    def _server_database(self) -> tuple[str, int, str | None]:
        """Where the URL connects, as asyncpg's dialect reads it: `?host=` and `?port=`
        before the URL's own, `?host=h:port` giving a port."""
        query = self.url.query
        host = _one(query.get("host")) or self.url.host or ""
        port = _one(query.get("port")) or ""
        if host.count(":") == 1:  # host:port (not an IPv6 address)
            host, _, given = host.partition(":")
            port = port or given
        number = int(port) if port.isascii() and port.isdigit() else self.url.port or 5432
        host = host.lower().rstrip(".")
        # PostgreSQL's default database is the user's name
        where = "local" if _local(host) else host
        return where, number, self.url.database or self.url.username

    def __repr__(self) -> str:
        return f"StoreUrl({self.shown!r})"

    def engine(self, bounds: StoreBounds) -> AsyncEngine:
        """An engine whose every wait is bounded: a pooled connection (`pool_timeout`), and
        on PostgreSQL a new connection (`connect_timeout`) and each statement
        (`statement_timeout`): a frozen server fails calls as retryable, never hangs them."""
        if self.backend == "sqlite":
            path = self.sqlite_path
            if path is not None and not path.parent.is_dir():
                raise ConfigurationError(
                    f"store {self.shown}: the folder {str(path.parent)!r} does not exist"
                )
            engine = create_async_engine(self.url, pool_timeout=bounds.pool)
            sa.event.listen(engine.sync_engine, "connect", _prepare_sqlite)
            return engine
        connect_args: dict[str, float] = {"timeout": bounds.connect}
        if bounds.statement is not None:
            connect_args["command_timeout"] = bounds.statement
        engine = create_async_engine(
            self.url, pool_pre_ping=False, pool_timeout=bounds.pool, connect_args=connect_args
        )
        mark_pooled(engine)
        return engine


# SQLite: exact decimal aggregates over the text of each value, and window numbers.


class _DecimalFold:
    def __init__(self, pick: Callable[[Decimal, Decimal], Decimal] | None) -> None:
        self.pick = pick
        self.value: Decimal | None = None

    def step(self, text: str | None) -> None:
        if text is None:
            return
        value = Decimal(text)
        with localcontext(EXACT):  # sums exact, as on memory and PostgreSQL
            if self.value is None:
                self.value = value if self.pick is not None else Decimal(0) + value
            elif self.pick is None:
                self.value += value
            else:
                self.value = self.pick(self.value, value)

    def finalize(self) -> str | None:
        return None if self.value is None else str(self.value)


class _Latest:
    """The value with the greatest (time, id), as `rules.Bucket.add_latest` keeps it."""

    def __init__(self) -> None:
        self.key: tuple[int, str] | None = None
        self.value: str | None = None

    def step(self, ts: int, event_id: str, text: str) -> None:
        if self.key is None or (ts, event_id) > self.key:
            self.key, self.value = (ts, event_id), text

    def finalize(self) -> str | None:
        return self.value


def _dimension(dimensions: str | None, key: str) -> str | None:
    """A dimension's value from the stored JSON object, for any key (SQLite's JSON paths
    cannot name every key: quotes, backslashes, non-ASCII)."""
    if dimensions is None:
        return None
    value = json.loads(dimensions).get(key)
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=64)
def _bounds(text: str) -> list[int]:
    return [int(bound) for bound in json.loads(text)]


def _window(ts: int, bounds: str) -> int:
    """The index of the window [b_i, b_i+1) holding `ts` (the query keeps ts in range)."""
    return bisect.bisect_right(_bounds(bounds), ts) - 1


def canonical_dimensions(dimensions: Mapping[str, str] | str) -> str:
    """Dimensions as one text per set of pairs (sorted keys, no spaces): a rollup's key.
    Stored event dimensions (JSON text) and mappings give the same text."""
    pairs = json.loads(dimensions) if isinstance(dimensions, str) else dimensions
    return json.dumps(pairs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _add(left: str, right: str) -> str:
    with localcontext(EXACT):
        return str(Decimal(left) + Decimal(right))


def _md5(text: str) -> str:
    """PostgreSQL's md5(text), for the migration's rollups."""
    return hashlib.md5(text.encode()).hexdigest()


def _prepare_sqlite(dbapi_connection: Any, _: Any) -> None:
    """Per connection: WAL, a busy timeout (two processes may share the file), writers
    that leave checkpoints to the store's thread (`Checkpoints`), and the store's
    functions, registered on the sqlite3 connection in aiosqlite's own thread."""

    def register(connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=30000")
        # checkpoints are the store's thread's (`Checkpoints`); a writer's only past this
        connection.execute(f"PRAGMA wal_autocheckpoint={WRITER_CHECKPOINT_PAGES}")
        # typeshed's aggregate protocol wants int results: these fold exact decimal text
        aggregates: dict[str, tuple[int, Any]] = {
            "dec_sum": (1, lambda: _DecimalFold(None)),
            "dec_min": (1, lambda: _DecimalFold(min)),
            "dec_max": (1, lambda: _DecimalFold(max)),
            "latest_value": (3, _Latest),
        }
        for name, (arity, factory) in aggregates.items():
            connection.create_aggregate(name, arity, factory)
        connection.create_function("window_index", 2, _window, deterministic=True)
        connection.create_function("dimension", 2, _dimension, deterministic=True)
        connection.create_function("canonical", 1, canonical_dimensions, deterministic=True)
        connection.create_function("dec_add", 2, _add, deterministic=True)
        connection.create_function("md5", 1, _md5, deterministic=True)

    dbapi_connection.run_async(lambda conn: conn._execute(register, conn._conn))


# errors


_PASSING = re.compile(r"disk is full|disk I/O error|connection closed", re.IGNORECASE)
"""SQLite failures that a later try may not meet: a full disk or volume, a failing one,
a connection closed under a request (aiosqlite's own message)."""


def _sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a PostgreSQL failure, as asyncpg raised it or SQLAlchemy wrapped it."""
    origin = getattr(exc, "orig", None) or exc
    cause = getattr(origin, "__cause__", None) or origin
    sqlstate = getattr(cause, "sqlstate", None) or getattr(origin, "sqlstate", None)
    return sqlstate if isinstance(sqlstate, str) else None


def rolled_back(exc: BaseException) -> bool:
    """Whether the server rolled the transaction back on its own (a deadlock, a
    serialization failure: SQLSTATE class 40), so that none of it committed."""
    sqlstate = _sqlstate_of(exc)
    return sqlstate is not None and sqlstate.startswith("40")


def store_error(exc: BaseException, store: StoreUrl) -> MeteringError:
    """One line naming the store (password masked): unreachable stores are retryable,
    refused credentials are not, and a database that is not one is a configuration error."""
    origin = getattr(exc, "orig", None) or exc
    cause = getattr(origin, "__cause__", None) or origin
    sqlstate = _sqlstate_of(exc)
    detail = f"{type(cause).__name__}: {cause}".splitlines()[0]
    where = f"store {store.shown}"
    if sqlstate in ("28P01", "28000"):
        return AuthenticationError(f"{where} refused the credentials: {detail}", provider="sql")
    if isinstance(cause, sqlite3.OperationalError) and "locked" in str(cause):
        return ProviderUnavailableError(
            f"{where} is busy; it can be retried: {detail}", provider="sql"
        )
    if isinstance(cause, sqlite3.OperationalError) and _PASSING.search(str(cause)):
        return ProviderUnavailableError(
            f"{where} failed to write; it can be retried: {detail}", provider="sql"
        )
    if (sqlstate is not None and sqlstate[:2] in ("22", "23")) or isinstance(
        cause, sqlite3.IntegrityError | OverflowError
    ):  # data or constraint: the store refused this data; trying again cannot help, and
        # the pipeline halves the batch until the event it refuses stands alone
        return ValidationError(f"{where} refused the data: {detail}")
    if sqlstate == "3D000" or isinstance(cause, sqlite3.DatabaseError):
        return ConfigurationError(f"{where} cannot be used: {detail}")
    if rolled_back(exc):
        return ProviderUnavailableError(
            f"{where} rolled the transaction back; it can be retried: {detail}", provider="sql"
        )
    return ProviderUnavailableError(f"{where} is unreachable: {detail}", provider="sql")


STORE_FAILURES: tuple[type[BaseException], ...] = (
    OSError,  # TimeoutError included: a connection or statement past its bound
    sa.exc.TimeoutError,  # every pooled connection busy past pool_timeout
    OverflowError,  # a number past what the driver can send
    sa.exc.DBAPIError,
    sqlite3.Error,
)
"""What a database or its driver raises when the store itself fails."""
try:  # asyncpg's own, unwrapped: before SQLAlchemy sees a connection, and on the raw path
    import asyncpg

    STORE_FAILURES = (*STORE_FAILURES, asyncpg.PostgresError, asyncpg.InterfaceError)
except ImportError:  # pragma: no cover - PostgreSQL support not installed
    pass


# migrations


def _config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option(
        "script_location", str(resources.files("metering_core.sql") / "migrations")
    )
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def schema_revisions() -> tuple[str, list[str]]:
    """This code's newest revision, and every revision it knows."""
    script = ScriptDirectory.from_config(_config())
    head = script.get_current_head()
    assert head is not None
    return head, [revision.revision for revision in script.walk_revisions()]


def current_revision(connection: sa.Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


_alembic = threading.Lock()
"""Alembic's context is process-global: one migration at a time in a process."""


def migrate(connection: sa.Connection, *, upgrade: bool, shown: str) -> str:
    """Bring the schema to this code's head: create it in an empty database, upgrade when
    `upgrade` is allowed; refuse a database newer than this code. Returns the revision."""
    if connection.dialect.name == "postgresql":  # one process migrates; the others wait
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(4242001)"))
    else:
        # pysqlite opens a transaction only before DML, so DDL committed as it ran: a
        # process killed mid-upgrade left half a revision (rollups created, revision 0001),
        # and every later start failed. One write transaction holds the whole check and
        # upgrade: all of it commits, or none; other processes wait for it.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    head, known = schema_revisions()
    current = current_revision(connection)
    if current == head:
        return head
    if current is not None and current not in known:
        raise ConfigurationError(
            f"store {shown} has schema revision {current!r}, newer than this version of "
            f"metering-core knows (newest: {head!r}): upgrade metering-core"
        )
    if current is not None and not upgrade:
        raise ConfigurationError(
            f"store {shown} has schema revision {current!r}, older than {head!r}: "
            "run `metering db upgrade`"
        )
    with _alembic:
        command.upgrade(_config(connection), "head")
    return head
