"""Stores for the sql provider's tests: SQLite files, and a private PostgreSQL server.

The server is started from the PostgreSQL binaries on the machine, as the `postgres` user
when run as root (PostgreSQL refuses root), in a temporary directory, listening on a free
loopback port. Without binaries the PostgreSQL tests skip with the reason, unless
`METERING_REQUIRE_POSTGRES=1` (CI sets it), which makes them fail loudly instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL server; yields a URL (without a database name's suffix)."""
    pytest.importorskip("asyncpg")
    binaries = _binaries()
    if binaries is None:
        if os.environ.get("METERING_REQUIRE_POSTGRES") == "1":
            pytest.fail("METERING_REQUIRE_POSTGRES=1 but no PostgreSQL binaries were found")
        pytest.skip("no PostgreSQL binaries (/usr/lib/postgresql/*/bin) on this machine")
    root = Path(tempfile.mkdtemp(prefix="metering-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    subprocess.run(
        _as_postgres([str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_postgres(
            [
                str(binaries / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_postgres([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A fresh, empty database on the private server."""
    return new_database(postgres_server)


def new_database(postgres_server: str, icu_locale: str | None = None) -> str:
    """The URL of a new, empty database on the private server; with `icu_locale`, text
    sorts by that ICU collation, as in a production database made with a language's
    locale (the private server's own is C, which sorts by bytes)."""
    import asyncio

    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"
    collated = (
        f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}' LOCALE 'C.utf8'"
        if icu_locale
        else ""
    )

    async def create() -> None:
        connection = await asyncpg.connect(f"{postgres_server}/postgres")
        try:
            await connection.execute(f'CREATE DATABASE "{name}"{collated}')
        finally:
            await connection.close()

    asyncio.run(create())
    return f"{postgres_server}/{name}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'metering.db'}"
