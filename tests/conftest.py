import os
from pathlib import Path

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
