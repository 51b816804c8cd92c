"""The operando plan: cycle a cell in the beam, recording a pattern and the cell's readings."""

from __future__ import annotations

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from ..simulation.operando import cycling_protocol, rate_label


def operando(cell, detector, cycles: int = 1, rates=(1.0,), *, interval: float | None = None,
             max_points: int = 100_000, md=None):
    """Plan: ``cycles`` constant-current cycles (charge to the upper cut-off, then discharge
    to the lower one) of ``cell``, one event per ``interval`` s of cell time holding the
    detector's pattern and the cell's voltage, current, mode, rate, time and cycle — one
    event stream ("primary").

    ``rates``: a C-rate per cycle, or a ``(charge, discharge)`` pair per cycle (a shorter
    list repeats), e.g. ``[1.0, 0.2]`` or ``[(1.0, 0.2)]``. ``interval`` sets the cell's
    ``interval`` (seconds per reading). ``max_points`` guards against a cell that never
    reaches its cut-off. Returns the run's uid.
    """
    protocol = cycling_protocol(cycles, rates)
    _md = {"plan_name": "operando", "xrdml_scan": "operando",
           "detectors": [detector.name], "cell": cell.name,
           "plan_args": {"cycles": int(cycles),
                         "rates": [[rate_label(c), rate_label(d)] for c, d in protocol]},
           "hints": {"dimensions": [([cell.time.name], "primary")]}}
    _md.update(md or {})

    @bpp.stage_decorator([cell, detector])
    @bpp.run_decorator(md=_md)
    def inner():
        if interval is not None:
            yield from bps.mv(cell.interval, float(interval))
        points = 0
        for i, (r_charge, r_discharge) in enumerate(protocol):
            yield from bps.mv(cell.command, f"cycle {i}")
            for mode, rate in (("charge", r_charge), ("discharge", r_discharge)):
                yield from bps.mv(cell.command, f"{mode} {rate}")
                while not (yield from bps.rd(cell.at_cutoff)):
                    if points >= max_points:
                        raise RuntimeError(f"operando: {max_points} points without reaching "
                                           "the cut-off; raise max_points or check the cell")
                    yield from bps.trigger_and_read([cell, detector])
                    points += 1
        yield from bps.mv(cell.command, "rest 0")

    return (yield from inner())
