"""API-key auth: deny by default, decided on the normalised path; no spelling of a protected
route passes as a public one. Raw request targets are sent with http.client, byte for byte."""
import http.client

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from asyncllm.server import build_app
from server_helpers import RunningServer

KEY = "s3cret-key"


def _get(port: int, target: str, headers: dict | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", target, headers=headers or {})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.fixture(scope="module")
def auth_server(engine):
    srv = RunningServer(build_app(engine, api_key=KEY, run_lifespan=False), lifespan="off")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mounted_auth_server(engine):
    parent = Starlette(routes=[Mount("/llm", build_app(engine, api_key=KEY, run_lifespan=False))])
    srv = RunningServer(parent, lifespan="off")
    yield srv
    srv.stop()


GOOD = {"Authorization": f"Bearer {KEY}"}

PROTECTED_SPELLINGS = [
    "/v1/models", "//v1/models", "/v1//models", "/v1/models/", "/v1%2Fmodels", "/v1%2fmodels", "/./v1/models",
    "/health/../v1/models", "/V1/models", "/v1/./models", "/%2Fv1/models", "/v1/models?x=/health", "/tokenize",
    "/health/", "//health", "/health/.", "/metrics/../v1/models", "/v1/models%00", "/nothing",
]


@pytest.mark.parametrize("target", PROTECTED_SPELLINGS)
def test_protected_spellings_need_the_key(auth_server, target):
    assert _get(auth_server.port, target) == 401
    assert _get(auth_server.port, target, {"Authorization": "Bearer wrong"}) == 401


@pytest.mark.parametrize("headers", [{"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}, {"authorization": "Bearer "},
                                     {"X-Api-Key": KEY}])
def test_malformed_credentials_are_refused(auth_server, headers):
    assert _get(auth_server.port, "/v1/models", headers) == 401


def test_right_key_passes_and_public_paths_are_open(auth_server):
    assert _get(auth_server.port, "/v1/models", GOOD) == 200
    assert _get(auth_server.port, "/v1/models", {"Authorization": f"bearer {KEY}"}) == 200
    assert _get(auth_server.port, "/health") == 200
    assert _get(auth_server.port, "/metrics") == 200
    assert _get(auth_server.port, "/") == 200  # the chat page (it asks for the key itself)


def test_mount_prefix_does_not_change_the_decision(mounted_auth_server):
    port = mounted_auth_server.port
    assert _get(port, "/llm/v1/models") == 401
    assert _get(port, "/llm//v1/models") == 401
    assert _get(port, "/llm/v1/models", GOOD) == 200
    assert _get(port, "/llm/health") == 200


def test_public_paths_are_configurable_and_env_key_works(engine, monkeypatch):
    monkeypatch.setenv("ASYNCLLM_API_KEY", KEY)
    srv = RunningServer(build_app(engine, public_paths=(), run_lifespan=False), lifespan="off")
    try:
        assert _get(srv.port, "/health") == 401
        assert _get(srv.port, "/health", GOOD) == 200
        assert _get(srv.port, "/v1/models", GOOD) == 200
    finally:
        srv.stop()
