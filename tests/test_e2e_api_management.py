"""End to end: the management API (``/api/v2/ai/providers``, ``/api/v2/ai/proxy-tokens``) on the
real daemon's admin listener, called with httpx: every endpoint with every kind of caller, every
error, writes that reach routing within a second, and keys that never come back or reach the log.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.fakes.upstream import FakeUpstream
from tests.harness import DaemonProcess, basic_auth

PROVIDERS = "/api/v2/ai/providers"
PROXY_TOKENS = "/api/v2/ai/proxy-tokens"
KEYS = ("sk-apitest-CENTRAL-KEY-0001", "sk-apitest-CENTRAL-KEY-0002", "sk-apitest-CENTRAL-KEY-0003")
AWS_SECRET = "AWS-apitest-SECRET-ACCESS-KEY"
SECRETS = (*KEYS, AWS_SECRET)
ROUTED_HOST = "llm.corp.example"

pytestmark = pytest.mark.usefixtures("clean_upstream")
_names = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


@dataclass(frozen=True)
class Tokens:
    admin: str
    auditor: str
    proxy: str


@pytest.fixture(scope="module")
def daemon(upstream: FakeUpstream) -> Iterator[DaemonProcess]:
    config = {
        "upstream_ca_file": upstream.ca_pem_path,
        "allowed_private_cidrs": ["127.0.0.0/8"],
        # Long, so that a write reaching routing within a second is the API's doing.
        "reload_interval": "60s",
        "log_level": "debug",
    }
    with DaemonProcess(config) as d:
        yield d


@pytest.fixture(scope="module")
def tokens(daemon: DaemonProcess) -> Tokens:
    def admin_token(name: str, role: str) -> str:
        return daemon.cli("admin-tokens", "create", name, "--role", role, check=True).stdout.strip()

    return Tokens(
        admin=admin_token("root", "admin"),
        auditor=admin_token("watcher", "auditor"),
        proxy=daemon.create_token("alice"),
    )


# Every response body the API sent in this module, to check that no key was ever in one.
_bodies: list[str] = []


@pytest.fixture(scope="module")
def http(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    def keep(response: httpx.Response) -> None:
        response.read()
        _bodies.append(response.text + str(response.headers))

    with httpx.Client(
        base_url=daemon.admin_url,
        trust_env=False,
        timeout=10.0,
        verify=daemon.admin_verify,
        event_hooks={"response": [keep]},
    ) as client:
        yield client


Api = Callable[..., httpx.Response]


@pytest.fixture(scope="module")
def api(http: httpx.Client, tokens: Tokens) -> Api:
    """``api(method, path, json=...)`` as the admin."""

    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {tokens.admin}", **kwargs.pop("headers", {})}
        return http.request(method, path, headers=headers, **kwargs)

    return call


def corp_provider(upstream: FakeUpstream, name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "openai-compat",
        "base_url": upstream.base_url,
        "hosts": [f"{name}.example"],
        **fields,
    }


# --- every endpoint, every caller ---------------------------------------------------------------

ROLES = ("admin", "auditor", "proxy", "none", "unknown", "malformed")


def caller_headers(role: str, tokens: Tokens) -> dict[str, str]:
    return {
        "admin": {"Authorization": f"Bearer {tokens.admin}"},
        # The header Coder's scripts send works like Bearer.
        "auditor": {"Coder-Session-Token": tokens.auditor},
        "proxy": {"Authorization": f"Bearer {tokens.proxy}"},
        "none": {},
        "unknown": {"Authorization": "Bearer abp_not-a-token-anyone-has"},
        # The admin's own token, in a scheme the API does not take.
        "malformed": {"Authorization": f"Basic {tokens.admin}"},
    }[role]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # {provider} / {token}: one made for the call
    allowed: dict[str, int]  # role -> status; any other role: 401 or 403
    body: str = ""  # "provider" / "token" / "patch": a body made for the call

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS = [
    Endpoint("GET", PROVIDERS, {"admin": 200, "auditor": 200}),
    Endpoint("POST", PROVIDERS, {"admin": 201}, body="provider"),
    Endpoint("GET", PROVIDERS + "/{provider}", {"admin": 200, "auditor": 200}),
    Endpoint("PATCH", PROVIDERS + "/{provider}", {"admin": 200}, body="patch"),
    Endpoint("DELETE", PROVIDERS + "/{provider}", {"admin": 204}),
    Endpoint("POST", PROVIDERS + "/reload", {"admin": 202}),
    Endpoint("GET", PROXY_TOKENS, {"admin": 200}),
    Endpoint("POST", PROXY_TOKENS, {"admin": 201}, body="token"),
    Endpoint("DELETE", PROXY_TOKENS + "/{token}", {"admin": 204}),
]


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_every_endpoint_answers_each_caller_as_its_role_allows(
    http: httpx.Client,
    api: Api,
    tokens: Tokens,
    upstream: FakeUpstream,
    endpoint: Endpoint,
    role: str,
) -> None:
    provider, token = unique("matrix"), unique("user")
    if "{provider}" in endpoint.path:
        assert api("POST", PROVIDERS, json=corp_provider(upstream, provider)).status_code == 201
    if "{token}" in endpoint.path:
        assert api("POST", PROXY_TOKENS, json={"name": token}).status_code == 201
    body = {
        "": None,
        "provider": corp_provider(upstream, provider),
        "patch": {"display_name": "Renamed"},
        "token": {"name": token},
    }[endpoint.body]
    response = http.request(
        endpoint.method,
        endpoint.path.format(provider=provider, token=token),
        headers=caller_headers(role, tokens),
        json=body,
    )
    unauthenticated = role in ("none", "unknown", "malformed")
    expected = endpoint.allowed.get(role, 401 if unauthenticated else 403)
    assert response.status_code == expected, response.text
    if expected >= 400:
        problem = response.json()
        assert problem["message"] and "detail" in problem
    if expected == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")
    if expected == 403:
        assert "role" in response.json()["message"] or "token" in response.json()["message"]


# --- providers ----------------------------------------------------------------------------------


def proxied_chat(daemon: DaemonProcess, token: str, host: str) -> httpx.Response:
    """One chat completion to ``host`` through the proxy, on a new connection."""
    with daemon.httpx_client(token, timeout=2.0) as client:
        return client.post(
            f"https://{host}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        )


def first_success(attempt: Callable[[], httpx.Response], within: float) -> httpx.Response:
    deadline = time.monotonic() + within
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = attempt()
        except httpx.HTTPError as error:
            last = error
        else:
            if response.status_code == 200:
                return response
            last = response.status_code
        time.sleep(0.02)  # polling interval, not synchronisation
    raise AssertionError(f"no success within {within}s; last: {last!r}")


def test_a_provider_created_through_the_api_routes_traffic_within_a_second(
    daemon: DaemonProcess, api: Api, tokens: Tokens, upstream: FakeUpstream
) -> None:
    body = corp_provider(
        upstream, "corp", hosts=[ROUTED_HOST], api_keys=[{"api_key": KEYS[0]}], display_name="Corp"
    )
    response = api("POST", PROVIDERS, json=body)
    created_at = time.monotonic()
    assert response.status_code == 201, response.text
    first_success(lambda: proxied_chat(daemon, tokens.proxy, ROUTED_HOST), within=1.0)
    assert time.monotonic() - created_at < 1.0
    (request,) = upstream.requests
    assert request.headers["authorization"] == f"Bearer {KEYS[0]}"
    view = response.json()
    assert view["status"] == "enabled" and view["hosts"] == [ROUTED_HOST]
    assert view["display_name"] == "Corp" and view["base_url"] == upstream.base_url.rstrip("/")
    (key,) = view["api_keys"]
    assert key["masked"] == "sk-\u20260001" and len(key["id"]) == 12


def test_patch_keeps_adds_and_deletes_keys_by_id_and_routing_follows(
    daemon: DaemonProcess, api: Api, tokens: Tokens, upstream: FakeUpstream
) -> None:
    name = unique("keys")
    host = f"{name}.example"
    body = corp_provider(upstream, name, api_keys=[{"api_key": KEYS[0]}, {"api_key": KEYS[1]}])
    first, second = (key["id"] for key in api("POST", PROVIDERS, json=body).json()["api_keys"])
    response = api(
        "PATCH", f"{PROVIDERS}/{name}", json={"api_keys": [{"api_key": KEYS[2]}, {"id": second}]}
    )
    assert response.status_code == 200, response.text
    keys = response.json()["api_keys"]
    assert [key["masked"] for key in keys] == ["sk-\u20260003", "sk-\u20260002"]
    assert keys[1]["id"] == second and keys[0]["id"] not in (first, second)
    # The new first key is the one injected, within a second of the PATCH.
    first_success(lambda: proxied_chat(daemon, tokens.proxy, host), within=1.0)
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {KEYS[2]}"


def test_patch_leaves_absent_fields_as_they_are(api: Api, upstream: FakeUpstream) -> None:
    name = unique("absent")
    body = corp_provider(upstream, name, display_name="Before", api_keys=[{"api_key": KEYS[0]}])
    before = api("POST", PROVIDERS, json=body).json()
    after = api("PATCH", f"{PROVIDERS}/{name}", json={"enabled": False}).json()
    assert after["status"] == "disabled" and after["enabled"] is False
    for field in ("display_name", "base_url", "hosts", "allow_byok", "api_keys", "settings"):
        assert after[field] == before[field], field
    assert api("PATCH", f"{PROVIDERS}/{name}", json={}).json()["enabled"] is False


def test_secret_settings_come_back_masked_and_a_masked_value_sent_back_keeps_them(
    api: Api,
) -> None:
    name = unique("aws")
    settings = {
        "region": "us-east-1",
        "model": "anthropic.claude-sonnet-4-6",
        "access_key_id": "AKID",
        "secret_access_key": AWS_SECRET,
    }
    body = {"name": name, "type": "bedrock", "hosts": [f"{name}.example"], "settings": settings}
    created = api("POST", PROVIDERS, json=body)
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["settings"] == {
        "region": "us-east-1",
        "model": "anthropic.claude-sonnet-4-6",
        "access_key_id": "***",
        "secret_access_key": "***",
    }
    assert view["status"] == "enabled"
    edited = {**view["settings"], "region": "eu-west-1"}
    patched = api("PATCH", f"{PROVIDERS}/{name}", json={"settings": edited})
    assert patched.status_code == 200, patched.text
    assert patched.json()["settings"]["region"] == "eu-west-1"
    assert patched.json()["status"] == "enabled"  # the credentials are still there
    missing = api("PATCH", f"{PROVIDERS}/{name}", json={"settings": {"session_token": "***"}})
    assert missing.status_code == 400
    assert missing.json()["validations"][0]["field"] == "settings.session_token"


def test_list_and_get_show_status_and_reason(api: Api, tokens: Tokens, http: httpx.Client) -> None:
    name = unique("strict")
    body = {"name": name, "type": "anthropic", "hosts": [f"{name}.example"], "allow_byok": False}
    assert api("POST", PROVIDERS, json=body).status_code == 201
    listed = {p["name"]: p for p in api("GET", PROVIDERS).json()}
    assert listed[name]["status"] == "error"
    assert listed[name]["status_reason"] == "no keys configured and BYOK is off"
    as_auditor = http.get(f"{PROVIDERS}/{name}", headers={"Coder-Session-Token": tokens.auditor})
    assert as_auditor.json() == listed[name]


def test_delete_answers_204_then_404_and_the_name_is_not_seeded_again(
    daemon: DaemonProcess, api: Api
) -> None:
    assert api("DELETE", f"{PROVIDERS}/anthropic").status_code == 204
    assert api("GET", f"{PROVIDERS}/anthropic").status_code == 404
    assert api("DELETE", f"{PROVIDERS}/anthropic").status_code == 404
    # Seeding runs at start: a restart must not bring the default provider back.
    daemon.stop()
    daemon.start()
    assert "anthropic" not in {p["name"] for p in api("GET", PROVIDERS).json()}


def test_reload_answers_202_and_reloads(daemon: DaemonProcess, api: Api) -> None:
    before = daemon.metric("providers_last_reload_timestamp_seconds") or 0.0
    response = api("POST", f"{PROVIDERS}/reload")
    assert response.status_code == 202 and response.content == b""
    daemon.wait_for(
        lambda: (daemon.metric("providers_last_reload_timestamp_seconds") or 0.0) > before,
        timeout=1.0,
    )


# --- errors -------------------------------------------------------------------------------------


def as_json(body: Any) -> dict[str, Any]:
    """Request arguments sending ``body`` as ASCII JSON: a lone surrogate goes as its ``\\ud800``
    escape (httpx's ``json=`` would fail to encode it)."""
    return {"content": json.dumps(body), "headers": {"Content-Type": "application/json"}}


def azure(settings: dict[str, Any]) -> dict[str, Any]:
    return {"name": "x", "type": "azure", "base_url": "https://az.example", "settings": settings}


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


BAD_CREATES = [
    ({"name": "Bad_Name", "type": "openai"}, "name", "expected a provider name"),
    ({"name": "x", "type": "nope"}, "type", "unknown provider type 'nope'"),
    ({"name": "x", "type": "openai", "base_url": "ftp://x.example"}, "base_url", "http"),
    ({"name": "x", "type": "openai-compat"}, "base_url", "has no default base_url"),
    ({"name": "x", "type": "openai", "hosts": ["*.x.example"]}, "hosts[0]", "wildcards"),
    ({"name": "x", "type": "openai", "api_keys": [{"api_key": "a b"}]}, "api_keys[0].api_key", ""),
    ({"name": "x", "type": "openai", "api_keys": [{"api_key": ""}]}, "api_keys[0].api_key", ""),
    ({"name": "x", "type": "openai", "api_keys": [{"api_key": "k"}] * 6}, "api_keys", ""),
    (
        {"name": "x", "type": "openai", "settings": {"region": "eu"}},
        "settings.region",
        "no setting",
    ),
    ({"name": "x", "type": "openai", "enabled": "yes"}, "enabled", "boolean"),
    ({"name": "x", "type": "openai", "api_key": KEYS[0]}, "api_key", "Extra inputs"),
    ({"type": "openai"}, "name", "required"),
    ({"name": "x\n", "type": "openai"}, "name", "expected a provider name"),
    (azure({"deployments": nested(20)}), "settings", "nested deeper than 16 levels"),
    (azure({"deployments": {"gpt-4o": "\ud800"}}), "settings", "not valid UTF-8"),
    ({"name": "x", "type": "openai", "display_name": "a\u001bb"}, "display_name", "control"),
]


@pytest.mark.parametrize(("body", "field", "message"), BAD_CREATES)
def test_bad_input_is_400_naming_the_field_and_creates_nothing(
    api: Api, body: dict[str, Any], field: str, message: str
) -> None:
    response = api("POST", PROVIDERS, **as_json(body))
    assert response.status_code == 400, response.text
    problem = response.json()
    assert field in [v["field"] for v in problem["validations"]], problem
    assert message in problem["message"] + str(problem["validations"])
    assert "x" not in {p["name"] for p in api("GET", PROVIDERS).json()}


def test_a_body_that_is_not_json_is_400(api: Api) -> None:
    response = api(
        "POST", PROVIDERS, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["validations"]


def test_a_caller_without_a_valid_token_gets_401_whatever_the_body(
    http: httpx.Client, tokens: Tokens
) -> None:
    for headers in ({}, {"Authorization": "Bearer abp_unknown"}):
        response = http.post(
            PROVIDERS, content=b"{not json", headers={**headers, "Content-Type": "application/json"}
        )
        assert response.status_code == 401, response.text


def test_patch_errors_name_the_field(api: Api, upstream: FakeUpstream) -> None:
    name = unique("patch")
    body = corp_provider(upstream, name, api_keys=[{"api_key": KEYS[0]}])
    key_id = api("POST", PROVIDERS, json=body).json()["api_keys"][0]["id"]
    for patch, field in (
        ({"api_keys": [{"id": "000000000000"}]}, "api_keys[0].id"),
        ({"api_keys": [{"id": key_id}, {"id": key_id}]}, "api_keys[1].id"),
        ({"api_keys": [{}]}, "api_keys[0]"),
        ({"api_keys": [{"id": key_id, "api_key": KEYS[1]}]}, "api_keys[0]"),
        ({"base_url": "not a url"}, "base_url"),
        ({"hosts": ["a b.example"]}, "hosts[0]"),
        ({"type": "nope"}, "type"),
        ({"nickname": "x"}, "nickname"),
        # A lone surrogate cannot be sent back as it is: named escaped, never a 500.
        ({"settings": {"\ud800": 1}}, "settings.\\ud800"),
    ):
        response = api("PATCH", f"{PROVIDERS}/{name}", **as_json(patch))
        assert response.status_code == 400, (patch, response.text)
        assert [v["field"] for v in response.json()["validations"]] == [field], response.text
    assert api("GET", f"{PROVIDERS}/{name}").json()["api_keys"][0]["id"] == key_id


def test_a_method_a_path_does_not_serve_is_405_listing_those_it_does(api: Api) -> None:
    response = api("PUT", f"{PROVIDERS}/openai", json={})
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, PATCH"
    assert api("PUT", PROXY_TOKENS).headers["allow"] == "GET, POST"


def test_unknown_names_are_404(api: Api) -> None:
    for method, path, body in (
        ("GET", f"{PROVIDERS}/ghost", None),
        ("PATCH", f"{PROVIDERS}/ghost", {"enabled": False}),
        ("DELETE", f"{PROVIDERS}/ghost", None),
        ("DELETE", f"{PROXY_TOKENS}/ghost", None),
    ):
        response = api(method, path, json=body)
        assert response.status_code == 404, (method, path)
        assert "'ghost' does not exist" in response.json()["message"]


def test_duplicate_names_are_409(api: Api) -> None:
    response = api("POST", PROVIDERS, json={"name": "openai", "type": "openai"})
    assert response.status_code == 409
    assert response.json()["message"] == "provider 'openai' already exists"
    name = unique("dup")
    assert api("POST", PROXY_TOKENS, json={"name": name}).status_code == 201
    response = api("POST", PROXY_TOKENS, json={"name": name})
    assert response.status_code == 409 and "already exists" in response.json()["message"]


def test_a_bad_token_name_is_400(api: Api) -> None:
    response = api("POST", PROXY_TOKENS, json={"name": "has space"})
    assert response.status_code == 400
    assert response.json()["validations"][0]["field"] == "name"


# --- proxy tokens -------------------------------------------------------------------------------


def test_a_created_token_works_and_shows_its_last_use(
    daemon: DaemonProcess, api: Api, upstream: FakeUpstream
) -> None:
    name = unique("user")
    created = api("POST", PROXY_TOKENS, json={"name": name})
    assert created.status_code == 201
    assert set(created.json()) == {"name", "token"}
    token = created.json()["token"]
    (listed,) = [t for t in api("GET", PROXY_TOKENS).json() if t["name"] == name]
    assert listed["last_used_at"] is None and token not in str(listed)
    assert daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code == 200
    daemon.edit_provider("openai", upstream.base_url, KEYS[0])
    daemon.reload_and_wait()
    assert proxied_chat(daemon, token, "api.openai.com").status_code == 200

    def last_used() -> str | None:
        tokens = {t["name"]: t for t in api("GET", PROXY_TOKENS).json()}
        return tokens[name]["last_used_at"]

    assert daemon.wait_for(last_used, timeout=10.0).startswith("20")


def test_a_revoked_token_is_refused_on_a_new_connection_within_a_second(
    daemon: DaemonProcess, api: Api
) -> None:
    name = unique("leaver")
    token = api("POST", PROXY_TOKENS, json={"name": name}).json()["token"]
    assert daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code == 200
    assert api("DELETE", f"{PROXY_TOKENS}/{name}").status_code == 204
    revoked_at = time.monotonic()
    deadline = revoked_at + 1.0
    while daemon.raw_connect("api.openai.com:443", basic_auth(token)).status_code != 407:
        assert time.monotonic() < deadline, "revoked token still accepted after 1s"
        time.sleep(0.02)  # polling interval, not synchronisation
    assert name not in {t["name"] for t in api("GET", PROXY_TOKENS).json()}


def test_a_revoked_admin_token_gets_401_at_once(daemon: DaemonProcess, http: httpx.Client) -> None:
    token = daemon.cli("admin-tokens", "create", "temp", "--role", "admin", check=True).stdout
    headers = {"Authorization": f"Bearer {token.strip()}"}
    assert http.get(PROVIDERS, headers=headers).status_code == 200
    daemon.cli("admin-tokens", "revoke", "temp", check=True)
    assert http.get(PROVIDERS, headers=headers).status_code == 401


# --- the document and secrets -------------------------------------------------------------------


def test_the_openapi_document_describes_every_management_path(daemon: DaemonProcess) -> None:
    paths = daemon.admin_get("/api/v2/openapi.json").json()["paths"]
    assert set(paths[PROVIDERS]) == {"get", "post"}
    assert set(paths[PROVIDERS + "/{name}"]) == {"get", "patch", "delete"}
    assert set(paths[PROVIDERS + "/reload"]) == {"post"}
    assert set(paths[PROXY_TOKENS]) == {"get", "post"}
    assert set(paths[PROXY_TOKENS + "/{name}"]) == {"delete"}
    assert "201" in paths[PROVIDERS]["post"]["responses"]
    assert "409" in paths[PROVIDERS]["post"]["responses"]


def test_no_key_or_secret_ever_appears_in_a_response_or_the_log(
    daemon: DaemonProcess, api: Api
) -> None:
    # Runs last in this module: every response above was kept by the client's event hook.
    api("GET", PROVIDERS)
    assert len(_bodies) > 100
    for secret in SECRETS:
        assert not [body for body in _bodies if secret in body], secret
        assert secret not in daemon.logs(), secret


# --- the admin listener over TLS ----------------------------------------------------------------


def test_the_api_is_served_over_tls_when_the_admin_listener_has_a_certificate(
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "admin.pem", tmp_path / "admin-key.pem", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    config = {"admin_tls_cert_file": str(cert), "admin_tls_key_file": str(key)}
    with DaemonProcess(config, admin_ca=ca_file) as daemon:
        token = daemon.cli("admin-tokens", "create", "root", "--role", "admin", check=True)
        assert daemon.admin_url.startswith("https://")
        with httpx.Client(trust_env=False, verify=daemon.admin_verify) as client:
            response = client.get(
                daemon.admin_url + PROVIDERS,
                headers={"Authorization": f"Bearer {token.stdout.strip()}"},
            )
        assert response.status_code == 200
        assert {p["name"] for p in response.json()} == {"openai", "anthropic"}
        with pytest.raises(httpx.HTTPError):
            httpx.get(
                daemon.admin_url.replace("https://", "http://") + PROVIDERS,
                trust_env=False,
                timeout=2.0,
            )
