from typer.testing import CliRunner

from bluesky_xrdml import catalog
from bluesky_xrdml.cli import app


def test_demo_files_raw_and_analysis_runs_and_saves_figures(tmp_path):
    directory = tmp_path / "xrdml-data"
    result = CliRunner().invoke(app, ["demo", "--directory", str(directory),
                                      "--map-points", "5", "--frames", "3"])
    assert result.exit_code == 0, result.output
    assert "success" in result.output
    pngs = sorted(p.name for p in (directory / "figures").glob("*.png"))
    assert [p.split("_")[0] for p in pngs] == ["maps", "peaks", "phases"]
    # the catalog persists: reopen it and find both raw runs with their analysis runs
    with catalog.embedded(directory) as (_, client):
        raw = [u for u in client if "xrdml" not in client[u].metadata["start"]]
        assert len(raw) == 2
        for uid in raw:
            (run,) = catalog.analyses(client, uid)
            assert run.metadata["stop"]["exit_status"] == "success"
            assert catalog.verify(run) == {}
            assert uid in result.output


def test_demo_against_an_unreachable_catalog_says_what_to_check():
    result = CliRunner().invoke(app, ["demo", "--catalog", "http://127.0.0.1:9/api"])
    assert result.exit_code == 2
    assert "no Tiled server answers at http://127.0.0.1:9" in result.output
