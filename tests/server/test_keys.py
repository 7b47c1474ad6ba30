"""The service's keys are its own settings, and no message ever shows one."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from metering_core import ConfigurationError, Metering
from metering_core.cli import app
from metering_core.server.settings import configured_keys

SECRET = "sk_live_SECRET"


def test_a_bad_scope_names_the_key_by_position_never_by_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "METERING_KEYS",
        f'{{"ok-key": {{"scopes": ["usage:read"]}}, "{SECRET}": {{"scopes": ["usage:writ"]}}}}',
    )
    with pytest.raises(ConfigurationError) as caught:
        configured_keys()
    assert "key #2" in str(caught.value)
    assert "usage:writ" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "ok-key" not in str(caught.value)


def test_a_key_bound_to_an_empty_tenant_is_refused_naming_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "METERING_KEYS", f'{{"{SECRET}": {{"scopes": ["usage:read"], "tenant": ""}}}}'
    )
    with pytest.raises(ConfigurationError) as caught:
        configured_keys()
    assert "key #1: tenant" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_a_key_bound_to_a_tenant_cannot_replicate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror's key bound to a tenant by mistake had every forwarded event refused, for
    a reason that named neither (review)."""
    scopes = '["usage:write", "usage:replicate"]'
    monkeypatch.setenv("METERING_KEYS", f'{{"{SECRET}": {{"scopes": {scopes}, "tenant": "a"}}}}')
    with pytest.raises(ConfigurationError, match=r"key #1: .*usage:replicate is for a key bound"):
        configured_keys()


def test_keys_that_are_not_json_are_a_configuration_error_without_the_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERING_KEYS", f"{{{SECRET}: scopes}}")
    with pytest.raises(ConfigurationError, match="METERING_KEYS is not valid JSON") as caught:
        configured_keys()
    assert SECRET not in str(caught.value)


def test_serve_with_a_bad_key_exits_2_without_printing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_KEYS", f'{{"{SECRET}": {{"scopes": ["usage:writ"]}}}}')
    result = CliRunner().invoke(app, ["--provider", "memory", "serve"])
    assert result.exit_code == 2
    assert result.output.startswith("error: METERING_KEYS: key #1: scopes.0: Input should be")
    assert SECRET not in result.output


def test_a_library_user_never_reads_the_service_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_KEYS", "not json at all")
    with Metering("memory") as m:
        assert m.provider_name == "memory"


def test_keys_come_from_the_config_file_when_the_environment_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.delenv("METERING_KEYS", raising=False)
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    with open("metering.toml", "w") as file:
        file.write('[keys."k-1"]\nscopes = ["usage:read"]\ntenant = "acme"\n')
    keys = configured_keys()
    assert keys["k-1"].tenant == "acme"
    assert keys["k-1"].scopes == {"usage:read"}


@pytest.mark.parametrize(
    "entry",
    [
        f'{{"tenant-a": "{SECRET}"}}',  # the key where its settings belong
        f'{{"k": {{"scopes": ["usage:read"], "key": "{SECRET}"}}}}',  # an extra field
        f'{{"k": {{"scopes": ["{SECRET}"]}}}}',  # the key where a scope belongs
        f'{{"k": {{"scopes": ["usage:read"], "tenant": ["{SECRET}"]}}}}',
    ],
)
def test_no_misplaced_key_is_ever_shown(monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    monkeypatch.setenv("METERING_KEYS", entry)
    with pytest.raises(ConfigurationError) as caught:
        configured_keys()
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("raw", ['{"\\ud800": {"scopes": []}}', "[" * 100_000])
def test_undecodable_or_absurd_keys_are_configuration_errors(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("METERING_KEYS", raw)
    with pytest.raises(ConfigurationError):
        configured_keys()


ALL = [
    "meters:read",
    "meters:write",
    "usage:read",
    "usage:write",
    "customers:write",
    "metrics:read",
]


def test_each_route_looks_its_callers_key_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each comparison runs against every configured key (~50 us with a thousand): a route
    that checked twice (the key-first check, then its own dependency) paid it twice."""
    from fastapi.testclient import TestClient

    from metering_core import AsyncMetering
    from metering_core.server import create_app
    from metering_core.server.auth import Keys

    lookups: list[str] = []
    identify = Keys.identify

    def counted(self: Keys, scope: dict[str, object]) -> object:
        lookups.append(f"{scope['method']} {scope['path']}")
        return identify(self, scope)

    monkeypatch.setattr(Keys, "identify", counted)
    admin = {"Authorization": "Bearer admin"}
    app = create_app(AsyncMetering("memory"), keys={"admin": {"scopes": ALL}})
    event = {"id": "e1", "event_name": "api_calls", "customer_id": "acme"}
    detail = {"event_name": "api_calls", "tenantId": "acme"}
    message = {"id": "m1", "detail-type": "INGEST_USAGE", "detail": detail}
    with TestClient(app) as client:
        calls = [
            ("POST", "/meters", {"event_name": "api_calls"}),
            ("GET", "/meters", None),
            ("GET", "/capabilities", None),
            ("POST", "/usage", {"events": [event]}),
            ("POST", "/events", message),
            ("DELETE", "/usage", {"event_ids": ["e1"]}),
            ("POST", "/customers", {"id": "acme"}),
            ("DELETE", "/customers/acme", None),
            ("GET", "/metrics", None),
        ]
        for method, path, body in calls:
            lookups.clear()
            response = client.request(method, path, json=body, headers=admin)
            assert response.status_code < 300, (path, response.text)
            assert lookups == [f"{method} {path}"], path
        lookups.clear()
        assert client.get("/health").status_code == 200
        assert lookups == []
