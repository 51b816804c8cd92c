"""Powder rings on an area detector: integrated with pyFAI from the detector's PONI,
kept as the stream ``integrated``, then analysed like a 1D detector's patterns."""

import bluesky.plans as bp
import numpy as np
import pytest
from conftest import shared_data

from bluesky_xrdml.analysis.integrate import CalibrationError, PowderIntegrator
from bluesky_xrdml.analysis.roi import Roi
from bluesky_xrdml.callbacks import PowderIntegration, RoiIntensities, XRDMLCallback
from bluesky_xrdml.devices import ArraySignal


def ceo2():
    """The CeO2 frame as Dioptas (which made the PONI and the .xy) orients it: Dioptas
    flips TIFF images upside down, and the calibration belongs to that orientation."""
    import fabio

    folder = shared_data("ceo2_pilatus1m")
    frame = np.ascontiguousarray(np.flipud(fabio.open(folder / "CeO2_Pilatus1M.tif").data))
    return frame, folder / "CeO2_Pilatus1M.poni", np.loadtxt(folder / "CeO2_Pilatus1M.xy")


def strongest_peaks(tt, y, n):
    """2θ of the ``n`` strongest local maxima, refined by a parabola through 3 points."""
    from scipy.signal import find_peaks

    idx, _ = find_peaks(y, prominence=0.02 * np.ptp(y))
    idx = idx[np.argsort(y[idx])[::-1][:n]]
    a, b, c = y[idx - 1], y[idx], y[idx + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c)
    return np.sort(tt[idx] + shift * (tt[1] - tt[0]))


def test_ceo2_peaks_match_dioptas():
    frame, poni, xy = ceo2()
    step = xy[1, 0] - xy[0, 0]
    integ = PowderIntegrator(poni, npt=len(xy),
                             radial_range=(xy[0, 0] - step / 2, xy[-1, 0] + step / 2))
    assert integ.wavelength == pytest.approx(0.4066)
    res = integ.integrate(frame)
    assert np.allclose(res.two_theta, xy[:, 0], atol=1e-6)
    ours = strongest_peaks(res.two_theta, res.intensity[0], 40)
    theirs = strongest_peaks(xy[:, 0], xy[:, 1], 10)
    # each of Dioptas' 10 strongest peaks is one of ours, within 0.01°
    offsets = [np.min(np.abs(ours - t)) for t in theirs]
    assert max(offsets) < 0.01, (offsets, theirs)
    # and the CeO2 reflections are where the calibrant's d-spacings put them
    from pyFAI.calibrant import get_calibrant

    cal = get_calibrant("CeO2")
    cal.wavelength = integ.ai.wavelength
    expected = np.array(cal.get_2th()[:5]) * 180 / np.pi
    assert max(np.min(np.abs(ours - e)) for e in expected) < 0.02
    # masked pixels (negative: the Pilatus module gaps) are left out, not counted as 0
    assert (frame < 0).sum() > 10000
    assert np.all(res.sigma[0] >= 0)


def test_a_ring_frame_with_a_poni_is_integrated_and_feeds_the_roi_analysis(RE, collector):
    frame, poni, xy = ceo2()
    det = ArraySignal(name="pilatus_image", shape=frame.shape, dtype="<i4", value=frame)
    cb = XRDMLCallback(analyses=[RoiIntensities(rois=[Roi("CeO2_111", 7.3, 7.6)]), "bragg-peaks"],
                       calibrations={"pilatus_image": str(poni)},
                       integration=PowderIntegration(npt=1500, radial_range=(2.0, 30.0)))
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.count([det], num=2))
    assert cb.wait(timeout=120)
    (start,) = collector.of("start")
    # rings are integrated, not sent to the Bragg-peak analysis
    assert start["xrdml"]["routes"] == {"pilatus_image": ["integrate", "roi"]}
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    rows = collector.stream("integrated")
    assert [r["point"] for r in rows] == [1, 2]
    assert np.asarray(rows[0]["intensity"]).shape == (1500,)
    (desc,) = [d for d in collector.of("descriptor") if d["name"] == "integrated"]
    tt = np.asarray(desc["configuration"]["integration"]["data"]["two_theta"])
    assert tt.shape == (1500,) and 2.0 < tt[0] < tt[-1] < 30.0
    y = np.asarray(rows[0]["intensity"])
    assert abs(tt[np.argmax(y)] - 7.45) < 0.05  # CeO2 (111), the strongest ring
    patterns = collector.stream("patterns")
    assert [p["point"] for p in patterns] == [1, 2]
    assert patterns[0]["CeO2_111"] > 10 * patterns[0]["CeO2_111_std"]


def test_a_missing_poni_is_said_and_the_frames_do_not_go_to_bragg_peaks(RE, collector):
    det = ArraySignal(name="ring_image", shape=(64, 64), dtype="<u2",
                      value=np.ones((64, 64), np.uint16))
    cb = XRDMLCallback(analyses=["bragg-peaks"], calibrations={"ring_image": "/nowhere.poni"})
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.count([det], num=1))
    assert cb.wait(timeout=60)
    (stop,) = collector.of("stop")
    assert "nothing to analyse" in stop["reason"]
    assert "no PONI file at /nowhere.poni" in stop["reason"]
    with pytest.raises(CalibrationError, match="pyFAI-calib2"):
        PowderIntegrator("/nowhere.poni")
