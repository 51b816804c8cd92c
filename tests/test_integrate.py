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
    # the Pilatus module gaps (-1, -2) are left out, as with an explicit mask, and not
    # averaged in as counts
    gaps = frame < 0
    assert gaps.sum() > 10000
    masked = PowderIntegrator(poni, npt=len(xy), mask=gaps,
                              radial_range=(xy[0, 0] - step / 2, xy[-1, 0] + step / 2))
    ref = masked.integrate(np.where(gaps, 0, frame)).intensity[0]
    assert np.allclose(res.intensity[0], ref, rtol=1e-4, atol=1e-3)
    assert not np.allclose(res.intensity[0], integ.integrate(np.where(gaps, 0, frame))
                           .intensity[0], rtol=1e-3)


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


def test_a_map_of_ring_frames_gives_the_pqnet_maps_of_its_patterns(RE, collector):
    from bluesky_xrdml.devices import sim_beamline
    from bluesky_xrdml.devices.powder import TWO_THETA
    from bluesky_xrdml.devices.rings import RingDetector

    bl = sim_beamline(seed=3)
    det = RingDetector(name="rings", x=bl.x, y=bl.y, rotation=bl.rot, seed=3)
    step = (TWO_THETA[-1] - TWO_THETA[0]) / (TWO_THETA.size - 1)
    # integrated onto the grid pqnet-demo was trained on; the PONI is in the configuration
    cb = XRDMLCallback(analyses=["pqnet"], integration=PowderIntegration(
        npt=TWO_THETA.size, radial_range=(TWO_THETA[0] - step / 2, TWO_THETA[-1] + step / 2)))
    cb.subscribe(collector)
    RE.subscribe(cb)
    RE(bp.grid_scan([det], bl.y, -0.9, 0.9, 4, bl.x, -0.9, 0.9, 4))
    assert cb.wait(timeout=300)
    (start,) = collector.of("start")
    assert start["xrdml"]["routes"] == {"rings_pattern": ["pqnet"],
                                        "rings_image": ["integrate", "pqnet"]}
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    (from_patterns,) = collector.stream("maps")
    (from_rings,) = collector.stream("maps_rings_image")
    fractions = [k for k in from_patterns if k.endswith("_fraction")]
    assert fractions
    for key in fractions:
        a, b = np.asarray(from_patterns[key]), np.asarray(from_rings[key])
        assert a.shape == b.shape == (4, 4)
        assert np.nanmean(np.abs(a - b)) < 0.05, (key, a, b)


@pytest.mark.parametrize("split", ["bbox", "no"])
@pytest.mark.parametrize("polarization", [None, 0.95])
def test_the_fast_path_gives_pyfais_own_integrate1d(split, polarization):
    """Our product with pyFAI's look-up table is pyFAI's integrate1d (Poisson σ, masks,
    dead pixels, NaN pixels, polarisation, a radial range), at a fraction of its cost."""
    from bluesky_xrdml.analysis.integrate import load_integrator, ring_frame

    shape = (120, 150)
    poni = {"dist": 0.1, "poni1": 0.007, "poni2": 0.005, "rot1": 0.05, "rot2": -0.03,
            "wavelength": 0.5e-10, "detector": "Detector",
            "detector_config": {"pixel1": 100e-6, "pixel2": 100e-6, "max_shape": list(shape)}}
    ai = load_integrator(poni)
    tt = np.linspace(0, 30, 3000)
    expected = ring_frame(ai, tt, 10 + 500 * np.exp(-0.5 * ((tt - 7) / 0.1) ** 2), shape)
    frame = np.random.default_rng(1).poisson(expected).astype(np.int32)
    frame[5:9, :] = -1  # a module gap
    frame[50, 50] = -2  # a dead pixel
    frame[60:62, 3] = 0  # zero counts: Poisson variance max(1, I)
    as_float = frame.astype(np.float32)
    as_float[70, 20:30] = np.nan  # a float frame's bad pixels
    mask = np.zeros(shape, bool)
    mask[:, 100:104] = True
    method = (split, "csr", "cython")
    for radial_range, data in ((None, frame), ((3.0, 9.0), frame), ((3.0, 9.0), as_float)):
        ours = PowderIntegrator(ai, npt=200, radial_range=radial_range, mask=mask,
                                polarization=polarization, method=method).integrate(data)
        ref = ai.integrate1d(data, 200, unit="2th_deg", radial_range=radial_range,
                             method=method, error_model="poisson", dummy=-1.5,
                             delta_dummy=0.6, mask=mask, polarization_factor=polarization,
                             correctSolidAngle=False)
        assert np.allclose(ours.two_theta, ref.radial, atol=1e-9)
        # float32 sums of a few hundred pixels per bin, as in pyFAI
        assert np.allclose(ours.intensity[0], ref.intensity, rtol=1e-5,
                           atol=1e-5 * ref.intensity.max())
        assert np.allclose(ours.sigma[0], ref.sigma, rtol=1e-5, atol=1e-5 * ref.sigma.max())
        assert ours.intensity[0].max() > 100  # the ring is there
    # the user's integrator is used, not changed: its detector keeps its own mask
    assert ai.detector.mask is None or not ai.detector.mask[:, 100:104].any()
