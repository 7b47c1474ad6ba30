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
from contextlib import contextmanager
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


@contextmanager
def server(kind: str, data: Path) -> Iterator[int]:
    """A server of `kind` on a free loopback port, in its own process, until exit."""
    port = free_port()
    env = {
        **os.environ,
        "METERING_KEYS": json.dumps({KEY: {"scopes": ["usage:write", "meters:write"]}}),
    }
    if kind in (*ECHOES, NO_STORE):
        command = [sys.executable, str(HERE), "--app-server", kind, str(port)]
    else:
        env["METERING_PROVIDER"] = kind
        env["METERING_SQL_URL"] = f"sqlite:///{data / f'{port}.db'}"
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


async def post_all(port: int, requests: list[bytes], latencies: list[float]) -> None:
    """One keep-alive connection posting `requests` in turn, reading each answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:
            began = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            answer = await reader.readexactly(length)
            latencies.append(time.perf_counter() - began)
            if not head.startswith(b"HTTP/1.1 200") or b'"rejected":{}' not in answer.replace(
                b" ", b""
            ):
                raise RuntimeError(f"unexpected answer: {head[:40]!r} {answer[:200]!r}")
    finally:
        writer.close()


async def load(port: int, batch: int, clients: int, seconds: float, run: str) -> dict[str, float]:
    """Events/s and latency percentiles of `clients` connections posting for about
    `seconds` (the request count is sized by a short probe first)."""
    probe: list[float] = []
    await post_all(port, bodies(f"{run}-probe", batch, 20), probe)
    per_request = statistics.median(probe)
    count = max(40, int(seconds / per_request))
    requests = bodies(run, batch, count)
    shares = [requests[c::clients] for c in range(clients)]
    latencies: list[float] = []
    began = time.perf_counter()
    await asyncio.gather(*(post_all(port, share, latencies) for share in shares))
    elapsed = time.perf_counter() - began
    ordered = sorted(latencies)
    return {
        "events_per_s": count * batch / elapsed,
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
    }


def client(port: int, batch: int, clients: int, seconds: float, run: str) -> dict[str, float]:
    """The load, from its own process (the servers and the client share two cores)."""
    command = [sys.executable, str(HERE), "--client", str(port), str(batch), str(clients)]
    command += [str(seconds), run]
    output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
    figures: dict[str, float] = json.loads(output)
    return figures


def measure(kinds: list[str], seconds: float) -> dict[tuple[str, int, int], dict[str, float]]:
    results: dict[tuple[str, int, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as data:
        for kind in kinds:
            with server(kind, Path(data)) as port:
                if kind not in (*ECHOES, NO_STORE):
                    create_meter(port)
                for batch in BATCHES:
                    for clients in CLIENTS:
                        run = f"{kind}-{batch}-{clients}"
                        results[kind, batch, clients] = client(port, batch, clients, seconds, run)
                        figures = results[kind, batch, clients]
                        print(
                            f"{kind:>10}  batch {batch:>3}  clients {clients:>2}  "
                            f"{figures['events_per_s']:>9,.0f} events/s  "
                            f"p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms",
                            flush=True,
                        )
    return results


def report(results: dict[tuple[str, int, int], dict[str, float]], kinds: list[str]) -> None:
    print("\nratio to each ceiling (events/s), and p99/p50, same run:")
    for kind in (k for k in kinds if k not in ECHOES):
        for batch in BATCHES:
            for clients in CLIENTS:
                ours = results[kind, batch, clients]
                line = f"{kind:>10}  batch {batch:>3}  clients {clients:>2}  "
                for echo in ECHOES:
                    if (echo, batch, clients) in results:
                        ceiling = results[echo, batch, clients]["events_per_s"]
                        line += f"{ours['events_per_s'] / ceiling:5.2f}x {echo}  "
                line += f"p99/p50 {ours['p99_ms'] / ours['p50_ms']:4.1f}"
                print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    parser.add_argument("--servers", default="echo-json,echo-typed,no-store,memory,sql")
    parser.add_argument("--app-server", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=5, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.app_server:
        import uvicorn

        from metering_core.server import create_app

        kind, port = options.app_server
        app = (
            create_app(AsyncMetering(NoStore()))
            if kind == NO_STORE
            else echo_app(kind == "echo-typed")
        )
        uvicorn.run(app, port=int(port), log_level="warning")
        return
    if options.client:
        port, batch, clients, seconds, run = options.client
        figures = asyncio.run(load(int(port), int(batch), int(clients), float(seconds), run))
        print(json.dumps(figures))
        return
    print(f"metering-core service benchmark, {datetime.now(UTC):%Y-%m-%d}")
    kinds = options.servers.split(",")
    report(measure(kinds, options.seconds), kinds)


if __name__ == "__main__":
    main()
