import os
import tempfile
from pathlib import Path

# spooled runs of the tests go to a temporary folder, not ./xrdml-spool
os.environ.setdefault("XRDML_SPOOL", tempfile.mkdtemp(prefix="xrdml-spool-"))

import pytest
from bluesky import RunEngine

from bluesky_xrdml.devices import sim_beamline

SHARED_DATA = Path(os.environ.get("XRDML_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(*parts) -> Path:
    """A file of ../shared/data; the test is skipped where the folder is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture
def RE():
    return RunEngine({})


@pytest.fixture
def beamline():
    return sim_beamline(seed=3)


@pytest.fixture
def collector():
    """A document sink that keeps everything it is sent."""

    class Collector(list):
        def __call__(self, name, doc):
            self.append((name, doc))

        def of(self, name):
            return [d for n, d in self if n == name]

        def stream(self, stream_name):
            """Rows of one analysis stream as a list of dicts."""
            uids = {d["uid"] for d in self.of("descriptor") if d["name"] == stream_name}
            rows = []
            for page in self.of("event_page"):
                if page["descriptor"] in uids:
                    keys = list(page["data"])
                    rows += [{k: page["data"][k][i] for k in keys}
                             for i in range(len(page["seq_num"]))]
            return rows

    return Collector()


@pytest.fixture(scope="session")
def tiled_client(tmp_path_factory):
    """One embedded Tiled server for the whole session (~3-5 s to start)."""
    from bluesky_xrdml import catalog

    with catalog.embedded(tmp_path_factory.mktemp("catalog")) as (server, client):
        yield client


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiled_server(tmp_path_factory):
    """A real ``tiled serve catalog`` in a subprocess on 127.0.0.1, with an API key and a
    temporary SQLite catalog; stopped at the end of the session. Yields ``(uri, api_key)``."""
    import secrets
    import shutil
    import subprocess
    import sys
    import time

    import httpx

    tiled = shutil.which("tiled", path=str(Path(sys.executable).parent))
    if tiled is None:
        pytest.skip("the tiled command is not installed")
    root = tmp_path_factory.mktemp("tiled-serve")
    (root / "data").mkdir()
    key, port = secrets.token_hex(16), _free_port()
    proc = subprocess.Popen(
        # tiled's own CLI, with table operations in turn (bluesky_xrdml.tiled_server): a
        # bare DuckDB server timed out under our two concurrent writers and the retried
        # append was filed twice (a facility runs PostgreSQL, which takes concurrent writes)
        [sys.executable, "-m", "bluesky_xrdml.tiled_server",
         "serve", "catalog", str(root / "catalog.db"), "--init",
         "-w", str(root / "data"), "-w", f"duckdb:///{root / 'storage.duckdb'}",
         "--api-key", key, "--host", "127.0.0.1", "--port", str(port)],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tiled serve did not start: {(root / 'server.log').read_text()}")
            time.sleep(0.3)
        yield f"{base}/api", key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["embedded", "server"])
def any_catalog(request, tiled_client):
    """The same test against the embedded catalog and against a real server with a key.
    Yields ``(client, uri, api_key)``."""
    if request.param == "embedded":
        yield tiled_client, tiled_client.uri, tiled_client.context.api_key
        return
    from bluesky_xrdml import catalog

    uri, key = request.getfixturevalue("tiled_server")
    yield catalog.connect(uri, api_key=key), uri, key
