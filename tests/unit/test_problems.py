"""The API's error shape (CONTRACT section 12, Errors) for every kind of failure."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from aibridgeproxyd.web import problems
from aibridgeproxyd.web.api_providers import ProviderCreate
from aibridgeproxyd.web.problems import ApiError


class Body(BaseModel):
    name: str


def client() -> TestClient:
    app = FastAPI()
    problems.install(app)

    @app.post("/things")
    async def create(body: Body) -> dict[str, str]:
        return {"name": body.name}

    @app.get("/missing")
    async def missing() -> None:
        raise ApiError(404, "thing 'x' does not exist")

    return TestClient(app)


def test_every_error_carries_message_detail_and_a_validations_list() -> None:
    for response in (
        client().get("/missing"),
        client().get("/no-such-path"),
        client().delete("/things"),
    ):
        body = response.json()
        assert set(body) == {"message", "detail", "validations"}, body
        assert body["validations"] == []


def test_a_body_that_is_not_json_names_the_body_and_the_position() -> None:
    response = client().post(
        "/things", content=b'{"name": "a",,}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    (validation,) = response.json()["validations"]
    assert validation["field"] == "body"
    assert "not valid JSON" in validation["detail"] and "character" in validation["detail"]


def test_a_body_that_is_not_a_json_object_says_what_to_send() -> None:
    """``curl -d`` without ``Content-Type: application/json``, or a JSON array."""
    for sent in (
        client().post(
            "/things",
            content=b'{"name": "a"}',
            headers={"content-type": "application/x-www-form-urlencoded"},  # curl -d's
        ),
        client().post("/things", json=["a"]),
    ):
        assert sent.status_code == 400
        (validation,) = sent.json()["validations"]
        assert validation["field"] == "body"
        assert "JSON object" in validation["detail"]
        assert "Content-Type: application/json" in validation["detail"]


def test_a_field_error_names_the_field() -> None:
    response = client().post("/things", json={"name": 5})
    assert response.status_code == 400
    assert response.json()["validations"][0]["field"] == "name"


def test_a_value_off_its_pattern_is_told_what_is_expected_in_words_never_echoed() -> None:
    """The API's own models: a wildcard host, a key with a space, a bad provider name. The answer
    says what is expected instead of showing the regular expression, and never repeats the key."""
    app = FastAPI()
    problems.install(app)

    @app.post("/providers")
    async def create(body: ProviderCreate) -> None:
        raise AssertionError("refused before")

    body = {
        "name": "Bad_Name",
        "type": "openai",
        "hosts": ["*.example.com"],
        "api_keys": [{"api_key": "sk-secret with-space"}],
    }
    response = TestClient(app).post("/providers", json=body)
    assert response.status_code == 400
    details = {v["field"]: v["detail"] for v in response.json()["validations"]}
    assert set(details) == {"name", "hosts[0]", "api_keys[0].api_key"}
    assert "wildcards such as *.example.com are not supported" in details["hosts[0]"]
    assert details["name"].startswith("expected a provider name like openai-eu")
    assert "visible ASCII" in details["api_keys[0].api_key"]
    assert "sk-secret" not in response.text and "[A-Za-z0-9_]" not in response.text


def test_a_chunked_body_over_the_cap_is_413_whatever_the_parser_made_of_it() -> None:
    from aibridgeproxyd.web.body_limit import BodyLimit

    app = FastAPI()
    problems.install(app)

    @app.post("/things")
    async def create(body: Body) -> dict[str, str]:
        return {"name": body.name}

    app.add_middleware(BodyLimit, limit=1000)

    def chunks() -> object:
        yield b'{"name": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'

    response = TestClient(app).post(
        "/things", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["message"] == "request body larger than 1000 bytes"


def test_a_refused_record_is_404_409_or_400_naming_its_field_even_with_a_lone_surrogate() -> None:
    from aibridgeproxyd.management import Conflict, InvalidInput, NotFound

    app = FastAPI()
    problems.install(app)
    errors = {
        "missing": NotFound("provider 'x' does not exist", "name"),
        "duplicate": Conflict("provider 'x' already exists", "name"),
        "invalid": InvalidInput("setting 'a\ud800' is unknown", "settings.a\ud800"),
    }

    @app.get("/{kind}")
    async def refuse(kind: str) -> None:
        raise errors[kind]

    client = TestClient(app)
    assert client.get("/missing").status_code == 404
    assert client.get("/missing").json()["validations"] == []
    assert client.get("/duplicate").status_code == 409
    invalid = client.get("/invalid")
    assert invalid.status_code == 400
    assert invalid.json()["validations"] == [
        {"field": "settings.a\\ud800", "detail": "setting 'a\\ud800' is unknown"}
    ]
