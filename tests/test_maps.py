"""Maps from plain bluesky plans: snaking, any motor order, scans that are not grids."""

import bluesky.plans as bp
import numpy as np
import pytest

from bluesky_xrdml.analysis.maps import assemble, grid_index
from bluesky_xrdml.callbacks import XRDMLCallback

ROI = "Ni_111"


def run_map(RE, collector, plan):
    cb = XRDMLCallback(analyses=["roi"])
    cb.subscribe(collector)
    token = RE.subscribe(cb)
    RE(plan)
    RE.unsubscribe(token)
    assert cb.wait(timeout=120)
    (stop,) = collector.of("stop")
    assert stop["exit_status"] == "success", stop["reason"]
    (maps,) = collector.stream("maps")
    return maps, collector.stream("patterns")


def assert_grid_matches_points(maps, rows, dims, key=ROI):
    """Every measured point's value sits in the map at its measured position."""
    grid = np.asarray(maps[key])
    coords = [np.asarray(maps[d]) for d in dims]
    assert grid.shape == tuple(c.size for c in coords)
    assert np.isfinite(grid).all()
    for row in rows:
        idx = tuple(int(np.argmin(np.abs(c - row[d]))) for c, d in zip(coords, dims))
        for c, d, i in zip(coords, dims, idx):
            assert c[i] == pytest.approx(row[d], abs=1e-6)
        assert grid[idx] == pytest.approx(row[key])


@pytest.mark.parametrize("snake", [False, True])
def test_grid_scan_maps_are_placed_where_measured(RE, beamline, collector, snake):
    b = beamline
    maps, rows = run_map(RE, collector, bp.grid_scan(
        [b.powder], b.y, -0.9, 0.9, 5, b.x, -0.9, 0.9, 6, snake_axes=snake))
    assert np.allclose(maps["x"], np.linspace(-0.9, 0.9, 6))
    assert np.allclose(maps["y"], np.linspace(-0.9, 0.9, 5))
    assert_grid_matches_points(maps, rows, ("y", "x"))


def test_snaked_and_plain_grids_give_the_same_map(RE, beamline, collector):
    b = beamline
    plain, _ = run_map(RE, collector, bp.grid_scan([b.powder], b.y, -0.9, 0.9, 5,
                                                   b.x, -0.9, 0.9, 6))
    collector.clear()
    snaked, _ = run_map(RE, collector, bp.grid_scan([b.powder], b.y, -0.9, 0.9, 5,
                                                    b.x, -0.9, 0.9, 6, snake_axes=True))
    a, s = np.asarray(plain[ROI]), np.asarray(snaked[ROI])
    # Poisson noise differs between the two scans; a mirrored row would differ by the
    # map's structure (tens of per cent of its range)
    assert np.mean(np.abs(a - s)) < 0.05 * np.ptp(a)


def test_motor_order_is_the_plans(RE, beamline, collector):
    b = beamline
    maps, rows = run_map(RE, collector, bp.grid_scan([b.powder], b.x, -0.9, 0.9, 4,
                                                     b.y, -0.9, 0.9, 3, snake_axes=True))
    assert np.asarray(maps[ROI]).shape == (4, 3)  # (x, y): outer motor first
    assert_grid_matches_points(maps, rows, ("x", "y"))


def test_list_grid_scan_snaking_is_found_from_positions(RE, beamline, collector):
    b = beamline  # list_grid_scan does not record its snaking in the start document
    maps, rows = run_map(RE, collector, bp.list_grid_scan(
        [b.powder], b.y, [-0.8, 0.0, 0.8], b.x, [-0.9, -0.3, 0.3, 0.9], snake_axes=True))
    assert_grid_matches_points(maps, rows, ("y", "x"))


@pytest.mark.parametrize("plan", ["list_scan", "rel_spiral"])
def test_scans_that_are_not_grids_give_maps_on_the_measured_points(
        RE, beamline, collector, plan):
    b = beamline
    if plan == "list_scan":
        p = bp.list_scan([b.powder], b.x, [-0.5, 0.1, 0.6, -0.2], b.y, [0.3, -0.7, 0.2, 0.0])
    else:
        p = bp.rel_spiral([b.powder], b.x, b.y, 1.2, 1.2, 0.3, 4)
    maps, rows = run_map(RE, collector, p)
    n = len(rows)
    assert n >= 4
    assert np.asarray(maps[ROI]).shape == (n,)
    assert list(maps["point"]) == [r["point"] for r in rows]
    for key in ("x", "y", ROI):
        assert np.allclose(maps[key], [r[key] for r in rows])
    # the values follow the sample: compare with the phantom at the measured positions
    ph = b.powder.phantom
    truth = [ph.at(r["x"], r["y"])[ph.names.index("Ni")] for r in rows]
    if np.ptp(truth) > 0:
        assert np.corrcoef(maps[ROI], truth)[0, 1] > 0.9


def test_grid_index_snakes_every_other_pass():
    idx = grid_index(range(1, 7), (2, 3), snaking=(False, True))
    assert idx.tolist() == [[0, 0], [0, 1], [0, 2], [1, 2], [1, 1], [1, 0]]
    # 3 axes, the two inner ones snaked: bluesky reverses an axis on odd passes
    idx = grid_index(range(1, 9), (2, 2, 2), snaking=(False, True, True))
    assert idx.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0],
                            [1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0]]
    grid = assemble([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0], (2, 3), snaking=(False, True))
    assert np.array_equal(grid[0], [1, 2, 3]) and np.isnan(grid[1, 0])
    assert grid[1, 2] == 4.0


def test_scattered_maps_read_back_from_tiled_with_position_coordinates(RE, beamline,
                                                                        tiled_client):
    from bluesky_xrdml import catalog

    b = beamline
    cb = XRDMLCallback(analyses=["roi"])
    cb.subscribe(catalog.analysis_writer(tiled_client), background=True)
    RE.subscribe(cb)
    (uid,) = RE(bp.list_scan([b.powder], b.x, [-0.5, 0.1, 0.6], b.y, [0.3, -0.7, 0.2]))
    assert cb.wait(timeout=120)
    (run,) = catalog.analyses(tiled_client, uid)
    ds = catalog.maps(run)
    assert ds[ROI].dims == ("point",)
    assert np.allclose(ds["x"], [-0.5, 0.1, 0.6]) and np.allclose(ds["y"], [0.3, -0.7, 0.2])
    assert {"x", "y", "point"} <= set(ds.coords)


def _fly_like(det, x, y, xs, ys, md=None):
    """A hand-written plan, as fly scans often are: it moves and reads the sample stages,
    but names no motors in its start document."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp

    @bpp.run_decorator(md=md or {})
    def inner():
        for xv, yv in zip(xs, ys):
            yield from bps.mv(x, xv, y, yv)
            yield from bps.trigger_and_read([det, x, y])

    return (yield from inner())


def test_plans_that_name_no_motors_map_at_the_positions_their_events_carry(
        RE, beamline, collector):
    b = beamline
    xs, ys = [-0.5, 0.1, 0.6, 0.0], [0.3, -0.7, 0.2, 0.5]

    def maps_of(md=None, **kwargs):
        collector.clear()
        cb = XRDMLCallback(analyses=["roi"], **kwargs)
        cb.subscribe(collector, background=False)
        token = RE.subscribe(cb)
        RE(_fly_like(b.powder, b.x, b.y, xs, ys, md))
        RE.unsubscribe(token)
        assert cb.wait(timeout=120)
        (stop,) = collector.of("stop")
        assert stop["exit_status"] == "success", stop["reason"]
        return collector.stream("maps")

    assert maps_of() == []  # no motors known: points only, nothing to map
    # positions= names the keys of the positions: maps per point at those positions
    (maps,) = maps_of(positions=["x", "y"])
    assert np.allclose(maps["x"], xs) and np.allclose(maps["y"], ys)
    assert np.allclose(maps["point"], [1, 2, 3, 4])
    # bluesky's hints["dimensions"] say the same without the argument
    (maps,) = maps_of({"hints": {"dimensions": [(["x"], "primary"), (["y"], "primary")]}})
    assert np.allclose(maps["x"], xs) and np.allclose(maps["y"], ys)
