"""Server test fixtures: one tiny checkpoint and one shared server for the session."""
import pytest
from harness import start_server, write_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("server-ckpt"))


@pytest.fixture(scope="session", params=[False, True], ids=["sync", "async"])
def server(checkpoint, request):
    """Every server test runs twice: the engine reading each step's tokens before the next step, and
    with async scheduling (a GPU's default: the next step launched first)."""
    s = start_server(checkpoint, engine_kw=dict(async_scheduling=request.param))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client()
