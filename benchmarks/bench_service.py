"""`POST /usage` on `metering serve` beside the ceiling of HTTP and JSON on this machine.

Five servers, each in its own process under uvicorn: `metering serve` on memory and on
sql (a fresh SQLite file); two FastAPI endpoints that only parse the same bodies and
echo their ids, the ceilings: `echo-json` parses the JSON and nothing more; `echo-typed`
takes the events as a typed body parameter, as a FastAPI service does; and `no-store`,
the service's own app over a provider that accepts every event and keeps nothing: what
the service costs (keys, validation, answer) with a store that costs nothing, so the
bound above any real store's ratio. A separate client
process posts pre-built bodies over keep-alive connections: batches of 1, 25 and 500
events, from 1, 4 and 16 concurrent clients; it reports events/s and the p50/p99 of
request latency, and each server's ratio to both ceilings in the same run.

    python benchmarks/bench_service.py [--seconds S] [--servers echo-json,memory,...]
        [--cells 500x4,25x16,1x16] [--postgres postgresql://user@host:port]

The client speaks HTTP/1.1 over asyncio streams with requests built before timing, so
that it costs the shared two cores as little as possible; every answer's status is
checked, and every answer must report no rejected event."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from metering_core import AsyncMetering
from metering_core.interface import BaseProvider, Capabilities, Operation
from metering_core.models import (
    IngestResult,
    Meter,
    MeterCreate,
    Page,
    Usage,
    UsageEvent,
    UsageQuery,
)

KEY = "bench-key"
ECHOES = ("echo-json", "echo-typed")
NO_STORE = "no-store"
BATCHES = (1, 25, 500)
CLIENTS = (1, 4, 16)
HERE = Path(__file__).resolve()


class TypedEvent(BaseModel):
    """The fields of an event with their plain types, none of the library's checks."""

    id: str
    event_name: str
    customer_id: str
    value: Decimal
    timestamp: datetime
    dimensions: dict[str, str] = {}


class TypedBatch(BaseModel):
    events: list[TypedEvent]


def echo_app(typed: bool) -> FastAPI:
    """A ceiling. `json`: parse the body as JSON and answer with its ids, nothing else
    (HTTP and JSON alone). `typed`: the FastAPI idiom, a body parameter that parses the
    events into typed fields (what any FastAPI service pays before its own work)."""
    app = FastAPI()

    def answer(ids: list[str]) -> Response:
        body = json.dumps({"accepted": ids, "duplicates": [], "rejected": {}})
        return Response(body, media_type="application/json")

    if typed:

        @app.post("/usage")
        async def echo_typed(batch: TypedBatch) -> Response:
            return answer([event.id for event in batch.events])

    else:

        @app.post("/usage")
        async def echo_json(request: Request) -> Response:
            return answer([event["id"] for event in json.loads(await request.body())["events"]])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


CEILINGS = ("ceiling-sqlite", "ceiling-postgres")
"""The sql store's ceilings: HTTP + JSON + a durable idempotent write, nothing else."""

_CEILING_TABLE = """
CREATE TABLE events (
    seq {seq} PRIMARY KEY, id varchar(100) NOT NULL UNIQUE, meter_seq bigint NOT NULL,
    event_name varchar(100) NOT NULL, customer_id varchar(100) NOT NULL, ts bigint NOT NULL,
    value {value} NOT NULL, dimensions {json} NOT NULL, ingested_at bigint
)"""
_CEILING_INDEXES = {
    "sqlite": ["CREATE INDEX events_time ON events (meter_seq, ts, customer_id)"],
    "postgresql": [
        "CREATE INDEX events_customer ON events (meter_seq, customer_id, ts)",
        "CREATE INDEX events_time ON events (meter_seq, ts)",
    ],
}


def _rows(body: bytes) -> list[tuple[str, int, str, str, int, Decimal, str, int]]:
    """The events of a body as rows: timestamps to microseconds, values to exact
    decimals and dimensions to text, as a store keeps them."""
    now = int(time.time() * 1_000_000)
    rows = []
    for event in json.loads(body)["events"]:
        stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        micros = int(stamp.timestamp()) * 1_000_000 + stamp.microsecond
        dimensions = json.dumps(event.get("dimensions", {}), separators=(",", ":"))
        rows.append(
            (
                event["id"],
                1,
                event["event_name"],
                event["customer_id"],
                micros,
                Decimal(str(event["value"])),
                dimensions,
                now,
            )
        )
    return rows


def _answer(ids: list[str]) -> Response:
    body = json.dumps({"accepted": ids, "duplicates": [], "rejected": {}})
    return Response(body, media_type="application/json")


def ceiling_app(kind: str, url: str) -> FastAPI:
    """The sql store's ceiling: parse the JSON, convert the timestamps, insert the rows
    into a table of the events' shape (unique id, the same time index) with `ON CONFLICT
    DO NOTHING RETURNING id`, one commit per request, and answer with the ids stored.
    SQLite: one connection (WAL, synchronous=NORMAL, as the store), writers in turn;
    PostgreSQL: an asyncpg pool, one autocommitted statement per request."""
    app = FastAPI()
    state: dict[str, object] = {}

    if kind == "ceiling-sqlite":
        import aiosqlite

        lock = asyncio.Lock()

        @app.on_event("startup")
        async def open_sqlite() -> None:
            connection = await aiosqlite.connect(url)
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=NORMAL")
            ddl = _CEILING_TABLE.format(seq="INTEGER", value="text", json="text")
            await connection.execute(ddl.replace("PRIMARY KEY", "PRIMARY KEY AUTOINCREMENT"))
            for index in _CEILING_INDEXES["sqlite"]:
                await connection.execute(index)
            await connection.commit()
            state["db"] = connection

        @app.post("/usage")
        async def insert_sqlite(request: Request) -> Response:
            rows = _rows(await request.body())
            connection = state["db"]
            assert isinstance(connection, aiosqlite.Connection)
            values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows))
            statement = (
                "INSERT INTO events (id, meter_seq, event_name, customer_id, ts, value, "
                f"dimensions, ingested_at) VALUES {values} ON CONFLICT (id) DO NOTHING RETURNING id"
            )
            async with lock:
                stored = await connection.execute_fetchall(
                    statement,
                    [str(f) if isinstance(f, Decimal) else f for row in rows for f in row],
                )
                await connection.commit()
            return _answer([row[0] for row in stored])

    else:
        import asyncpg

        @app.on_event("startup")
        async def open_postgres() -> None:
            pool = await asyncpg.create_pool(url, min_size=4, max_size=10)
            ddl = _CEILING_TABLE.format(seq="bigserial", value="numeric", json="json")
            await pool.execute(ddl)
            for index in _CEILING_INDEXES["postgresql"]:
                await pool.execute(index)
            state["db"] = pool

        insert = (
            "INSERT INTO events (id, meter_seq, event_name, customer_id, ts, value, "
            "dimensions, ingested_at) SELECT * FROM unnest($1::text[], $2::bigint[], "
            "$3::text[], $4::text[], $5::bigint[], $6::numeric[], $7::json[], $8::bigint[]) "
            "ON CONFLICT (id) DO NOTHING RETURNING id"
        )

        @app.post("/usage")
        async def insert_postgres(request: Request) -> Response:
            columns = list(zip(*_rows(await request.body()), strict=True))
            pool = state["db"]
            assert isinstance(pool, asyncpg.Pool)
            stored = await pool.fetch(insert, *columns)
            return _answer([row[0] for row in stored])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


class NoStore(BaseProvider):
    """Accepts every event and keeps nothing (usage answers are not asked of it)."""

    name = NO_STORE
    default_capabilities = Capabilities(max_batch_size=10_000)

    async def ingest_batch(self, events: Sequence[UsageEvent]) -> IngestResult:
        return IngestResult(accepted=[event.id for event in events])

    async def create_meter(self, meter: MeterCreate) -> Meter:
        raise self.unsupported(Operation.CREATE_METER)

    async def fetch_meter(self, meter_id: str) -> Meter:
        raise self.unsupported(Operation.FETCH_METER)

    async def fetch_all_meters(self, *, limit: int = 100, cursor: str | None = None) -> Page[Meter]:
        raise self.unsupported(Operation.FETCH_ALL_METERS)

    async def fetch_usage(self, query: UsageQuery) -> Usage:
        raise self.unsupported(Operation.FETCH_USAGE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fresh_postgres(server_url: str, name: str) -> str:
    """A new, empty database on the PostgreSQL server at `server_url`; its URL."""
    import asyncpg

    async def create() -> None:
        connection = await asyncpg.connect(server_url.rsplit("/", 1)[0] + "/postgres")
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return f"{server_url.rsplit('/', 1)[0]}/{name}"


@contextmanager
def server(kind: str, data: Path, postgres: str | None) -> Iterator[int]:
    """A server of `kind` on a free loopback port, in its own process, until exit."""
    port = free_port()
    env = {
        **os.environ,
        "METERING_KEYS": json.dumps(
            {KEY: {"scopes": ["usage:write", "meters:write", "metrics:read"]}}
        ),
    }
    database = f"sqlite:///{data / f'{port}.db'}"
    if kind.endswith("postgres"):
        if postgres is None:
            raise SystemExit(f"{kind} needs --postgres URL")
        database = fresh_postgres(postgres, f"bench_{port}")
    if kind in (*ECHOES, NO_STORE):
        command = [sys.executable, str(HERE), "--app-server", kind, str(port)]
    elif kind in CEILINGS:
        address = database.removeprefix("sqlite:///")
        command = [sys.executable, str(HERE), "--app-server", kind, str(port), address]
    else:
        env["METERING_PROVIDER"] = "sql" if kind.startswith("sql") else kind
        env["METERING_SQL_URL"] = database
        command = [sys.executable, "-m", "metering_core.cli", "serve", "--port", str(port)]
        command += ["--log-level", "warning"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(port)
        yield port
    finally:
        process.terminate()
        process.wait()


def wait_until_up(port: int) -> None:
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no server on port {port}")


def create_meter(port: int) -> None:
    """The meter the events name (the echo endpoint has none to create)."""
    body = json.dumps({"event_name": "api_calls", "aggregation": "sum"}).encode()
    request = request_bytes("/meters", body, method="POST")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request)
        status = sock.recv(64)
    if not status.startswith(b"HTTP/1.1 201"):
        raise RuntimeError(f"creating the meter: {status!r}")


def request_bytes(path: str, body: bytes, method: str = "POST") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def bodies(run: str, batch: int, count: int) -> list[bytes]:
    """`count` requests of `batch` events each, every event id new."""
    requests = []
    for n in range(count):
        events = [
            {
                "id": f"{run}-{n}-{i}",
                "event_name": "api_calls",
                "customer_id": f"tenant-{(n * batch + i) % 1000}",
                "value": (n + i) % 7 + 1,
                "timestamp": "2026-11-25T10:00:00Z",
                "dimensions": {"region": ("eu", "us", "ap")[i % 3]},
            }
            for i in range(batch)
        ]
        requests.append(request_bytes("/usage", json.dumps({"events": events}).encode()))
    return requests


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer's head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


async def post_all(
    port: int, requests: list[bytes], latencies: list[float], until: float = float("inf")
) -> None:
    """One keep-alive connection posting `requests` in turn, reading each answer, until
    they run out or the clock passes `until`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:
            began = time.perf_counter()
            if began >= until:
                break
            writer.write(request)
            head, answer = await read_answer(reader)
            latencies.append(time.perf_counter() - began)
            if not head.startswith(b"HTTP/1.1 200") or b'"rejected":{}' not in answer.replace(
                b" ", b""
            ):
                raise RuntimeError(f"unexpected answer: {head[:40]!r} {answer[:200]!r}")
    finally:
        writer.close()


async def load(port: int, batch: int, clients: int, seconds: float, run: str) -> dict[str, float]:
    """Events/s and latency percentiles of `clients` connections posting for `seconds`.
    Requests are built first, twice as many as the clients could send at the latency of
    a short probe, one request at a time; each client stops at the deadline. (Sized as
    `seconds / latency` in all, a run of 16 clients had lasted a tenth of `seconds`, and
    its figure was a fraction of a second's.)"""
    probe: list[float] = []
    await post_all(port, bodies(f"{run}-probe", batch, 20), probe)
    per_request = statistics.median(probe)
    count = max(40, int(2 * clients * seconds / per_request))
    requests = bodies(run, batch, count)
    shares = [requests[c::clients] for c in range(clients)]
    latencies: list[float] = []
    health: list[float] = []
    done = asyncio.Event()
    watching = asyncio.create_task(watch_health(port, health, done))
    began = time.perf_counter()
    until = began + seconds
    await asyncio.gather(*(post_all(port, share, latencies, until) for share in shares))
    elapsed = time.perf_counter() - began
    done.set()
    await watching
    sent = len(latencies)
    if sent >= count:
        raise RuntimeError(f"every request was sent before the deadline ({count}): build more")
    ordered, answered = sorted(latencies), sorted(health) or [0.0]
    return {
        "events": (sent + 20) * batch,
        "events_per_s": sent * batch / elapsed,
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
        "health_p99_ms": answered[int(len(answered) * 0.99)] * 1000,
    }


async def watch_health(port: int, latencies: list[float], done: asyncio.Event) -> None:
    """`GET /health` every 20 ms on a connection of its own while the load runs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /health HTTP/1.1\r\nhost: bench\r\n\r\n"
    try:
        while not done.is_set():
            began = time.perf_counter()
            writer.write(request)
            await read_answer(reader)
            latencies.append(time.perf_counter() - began)
            await asyncio.sleep(0.02)
    finally:
        writer.close()


def client(port: int, batch: int, clients: int, seconds: float, run: str) -> dict[str, float]:
    """The load, from its own process (the servers and the client share two cores)."""
    command = [sys.executable, str(HERE), "--client", str(port), str(batch), str(clients)]
    command += [str(seconds), run]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    figures: dict[str, float] = json.loads(output)
    return figures


CEILING_OF = {"sql": "ceiling-sqlite", "sql-postgres": "ceiling-postgres"}
"""The ceiling each store's service is held against (the others: the echoes)."""


def measure(
    kinds: list[str],
    cells: list[tuple[int, int]],
    seconds: float,
    postgres: str | None,
    rounds: int,
) -> dict[tuple[str, int, int], list[dict[str, float]]]:
    """Each server's figures per cell, one a round. Every server runs from the start; in a
    round each cell is measured on each server in turn, so a service and its ceiling are
    measured seconds apart, not minutes: this machine's speed drifts by half within an
    hour, and a ratio of figures taken minutes apart measured the drift as much. Every
    other round takes the servers in reverse order: a run leaves work behind it (a
    checkpoint, PostgreSQL's autovacuum of the rows it wrote) that the next run pays for,
    and a fixed order had each service always follow its own ceiling. An even number of
    rounds puts each server first as often as second."""
    results: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as data, ExitStack() as servers:
        ports = {kind: servers.enter_context(server(kind, Path(data), postgres)) for kind in kinds}
        services = [kind for kind in kinds if kind not in (*ECHOES, NO_STORE, *CEILINGS)]
        for kind in services:
            create_meter(ports[kind])
        sent = dict.fromkeys(kinds, 0)
        for turn in range(rounds):
            for batch, clients in cells:
                for kind in kinds if turn % 2 == 0 else kinds[::-1]:
                    run = f"{kind}-{batch}-{clients}-{turn}"
                    figures = client(ports[kind], batch, clients, seconds, run)
                    results.setdefault((kind, batch, clients), []).append(figures)
                    sent[kind] += int(figures["events"])
                    print(
                        f"{kind:>16}  batch {batch:>3}  clients {clients:>2}  "
                        f"{figures['events_per_s']:>9,.0f} events/s  "
                        f"p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms  "
                        f"/health p99 {figures['health_p99_ms']:6.1f} ms",
                        flush=True,
                    )
        for kind in services:
            print(f"{kind:>16}  {counted(ports[kind], sent[kind])}", flush=True)
    return results


def counted(port: int, sent: int) -> str:
    """Whether `/metrics` counted every event sent (the probes' included) once."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"GET /metrics HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {KEY}\r\n"
            "connection: close\r\n\r\n".encode()
        )
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    figures: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("metering_events_ingested_total", "metering_pipeline_events_settled_total"):
            if line.startswith(name):
                figures[name] = figures.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    shown = ", ".join(f"{name} {value:,.0f}" for name, value in figures.items())
    return f"sent {sent:,}; /metrics: {shown or 'no counters found'}"


def report(results: dict[tuple[str, int, int], list[dict[str, float]]], kinds: list[str]) -> None:
    print("\nratio to each ceiling (events/s): the median of the rounds' (range), and p99/p50:")
    for kind, batch, clients in results:
        if kind in (*ECHOES, *CEILINGS):
            continue
        ours = results[kind, batch, clients]
        line = f"{kind:>16}  batch {batch:>3}  clients {clients:>2}  "
        ceilings = [CEILING_OF[kind]] if kind in CEILING_OF else list(ECHOES)
        for ceiling_kind in ceilings:
            if (ceiling_kind, batch, clients) in results:
                theirs = results[ceiling_kind, batch, clients]
                ratios = sorted(
                    mine["events_per_s"] / ceiling["events_per_s"]
                    for mine, ceiling in zip(ours, theirs, strict=True)
                )
                line += f"{statistics.median(ratios):5.2f}x {ceiling_kind} "
                line += f"({ratios[0]:.2f}-{ratios[-1]:.2f})  " if len(ratios) > 1 else " "
        spreads = [run["p99_ms"] / run["p50_ms"] for run in ours]
        line += f"p99/p50 {max(spreads):4.1f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--servers", default="echo-json,echo-typed,no-store,memory,sql")
    parser.add_argument(
        "--cells",
        default=",".join(f"{b}x{c}" for b in BATCHES for c in CLIENTS),
        help="batch x clients, comma-separated (default: every pair of 1, 25, 500 x 1, 4, 16)",
    )
    parser.add_argument("--postgres", help="a PostgreSQL server URL, for *-postgres servers")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over every cell and server")
    parser.add_argument("--app-server", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.app_server:
        import uvicorn

        from metering_core.server import create_app

        kind, port, *address = options.app_server
        if kind in CEILINGS:
            app = ceiling_app(kind, address[0])
        elif kind == NO_STORE:
            app = create_app(AsyncMetering(NoStore()))
        else:
            app = echo_app(kind == "echo-typed")
        uvicorn.run(app, port=int(port), log_level="warning")
        return
    if options.client:
        port, batch, clients, seconds, run = options.client
        figures = asyncio.run(load(int(port), int(batch), int(clients), float(seconds), run))
        print(json.dumps(figures))
        return
    print(f"metering-core service benchmark, {datetime.now(UTC):%Y-%m-%d}")
    kinds = options.servers.split(",")
    cells = [(int(b), int(c)) for b, c in (cell.split("x") for cell in options.cells.split(","))]
    report(measure(kinds, cells, options.seconds, options.postgres, options.rounds), kinds)


if __name__ == "__main__":
    main()
