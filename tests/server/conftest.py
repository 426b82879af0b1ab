import pytest

from asyncllm import AsyncEngine
from asyncllm.server import build_app
from server_helpers import RunningServer


@pytest.fixture(scope="module")
def engine():
    engine = AsyncEngine.from_args(dtype="float32", max_num_seqs=32)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = RunningServer(build_app(engine, run_lifespan=False), lifespan="off")
    yield srv
    srv.stop()
