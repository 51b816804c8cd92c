"""Real data from public beamline sources in ../shared/data (skipped where absent)."""

import json

import numpy as np
import pytest
from conftest import shared_data

from bluesky_xrdml.analysis import locate_peaks
from bluesky_xrdml.callbacks import XRDMLCallback


def test_real_usaxs_documents_flow_through_and_have_nothing_to_analyse(collector):
    runs = json.loads(shared_data("bluesky_documents", "usaxs_docs.json").read_text())
    cb = XRDMLCallback()
    cb.subscribe(collector)
    for docs in runs.values():
        for name, doc in docs:
            cb(name, doc)
    assert cb.wait(timeout=60)
    assert cb.dispatch_errors == 0 and cb.sink_errors == 0
    stops = collector.of("stop")
    assert len(stops) == len(runs)
    for summary, stop in zip(cb.summaries(), stops):
        assert stop["exit_status"] == "success"
        assert stop["reason"].startswith("nothing to analyse"), stop["reason"]
        assert summary["errors"] == 0
    # the 7999-channel MCA spectra are 1D arrays, but have no 2θ axis: said so, not guessed
    flyscans = [s for s in cb.summaries() if "struck_mca1_spectrum" in s["ignored"]]
    assert flyscans and "2θ axis" in flyscans[0]["ignored"]["struck_mca1_spectrum"]
    assert {d["xrdml"]["raw_uid"] for d in collector.of("start")} == {
        docs[0][1]["uid"] for docs in runs.values()}


def ruby_frame(i, panel="ff1"):
    path = shared_data("ruby_dexela", f"mruby-0129_000004_{panel}_000012-cachefile.npz")
    z = np.load(path)
    frame = np.zeros(tuple(z["shape"]), np.uint16)
    frame[z[f"{i}_row"], z[f"{i}_col"]] = z[f"{i}_data"]
    return frame, z


@pytest.mark.parametrize("panel", ["ff1", "ff2"])
def test_real_ruby_frames_give_plausible_spot_tables(panel):
    counts = []
    for i in (0, 360, 720, 1080):
        frame, z = ruby_frame(i, panel)
        table = locate_peaks(frame, frame_index=i)
        nonzero = z[f"{i}_data"].size
        counts.append(len(table))
        assert len(table) <= nonzero / 3  # a spot needs at least 3 pixels
        if len(table):
            assert table["row"].between(-0.5, frame.shape[0] - 0.5).all()
            assert table["col"].between(-0.5, frame.shape[1] - 0.5).all()
            assert (table["intensity"] > 0).all()
            # every centre sits on recorded counts: the brightest pixel is within 2 px
            for r, c in zip(table["row"], table["col"]):
                r0, c0 = int(round(r)), int(round(c))
                assert frame[max(r0 - 2, 0):r0 + 3, max(c0 - 2, 0):c0 + 3].max() > 0
    assert sum(counts) > 0
