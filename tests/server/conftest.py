"""Server test fixtures: one tiny checkpoint and one shared server for the session."""
import pytest
from harness import start_server, write_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("server-ckpt"))


@pytest.fixture(scope="session")
def server(checkpoint):
    s = start_server(checkpoint)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client()
