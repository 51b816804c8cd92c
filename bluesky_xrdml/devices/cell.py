"""A simulated battery cell under a cycler: reads voltage, current, mode and C-rate."""

from __future__ import annotations

from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import NullStatus

from ..simulation.operando import CellModel, CellParameters


class BatteryCell(Device):
    """An NMC | graphite cell on a constant-current cycler (``simulation.operando.CellModel``).

    Readings: ``voltage`` (V), ``current`` (in C, signed: > 0 charging), ``mode``
    ("charge" / "discharge" / "rest"), ``rate`` (C-rate), ``time`` (s of cell time),
    ``cycle``. Every ``trigger()`` advances the cell clock by ``interval`` seconds (a
    configuration signal; the acquisition time of one pattern) times a random factor in
    1 ± ``jitter``/2, never past a voltage cut-off (``at_cutoff`` then reads 1). Set what
    the cycler does with ``set_current(mode, rate)`` — the ``operando`` plan does this
    through ``command``. The true state of charge of each reading is kept in ``truth``.
    """

    voltage = Cpt(Signal, value=0.0, kind="hinted", metadata={"units": "V"})
    current = Cpt(Signal, value=0.0, kind="normal", metadata={"units": "C"})
    mode = Cpt(Signal, value="rest", kind="normal")
    rate = Cpt(Signal, value=0.0, kind="normal", metadata={"units": "C"})
    time = Cpt(Signal, value=0.0, kind="normal", metadata={"units": "s"})
    cycle = Cpt(Signal, value=0, kind="normal")
    at_cutoff = Cpt(Signal, value=0, kind="omitted")
    command = Cpt(Signal, value="rest 0", kind="omitted", doc="'charge 1.0', 'discharge 0.2', "
                  "'rest 0' or 'cycle N'")
    interval = Cpt(Signal, value=60.0, kind="config", doc="cell seconds per reading")
    jitter = Cpt(Signal, value=0.5, kind="config")

    def __init__(self, *args, params: CellParameters | None = None, soc: float = 0.0,
                 seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        import numpy as np

        self.model = CellModel(params, soc=soc)
        self._rng = np.random.default_rng(seed)
        self.truth: list = []  # CellState of every trigger
        self.command.subscribe(self._on_command, run=False)
        self._publish()

    def set_current(self, mode: str, rate: float) -> None:
        self.model.set_current(mode, rate)
        self._publish()

    def _on_command(self, value=None, **kwargs):
        verb, _, arg = str(value).partition(" ")
        if verb == "cycle":
            self.model.cycle = int(arg)
            self._publish()
        else:
            self.set_current(verb, float(arg or 0))

    def _publish(self):
        st = self.model.state()
        self.voltage.put(float(st.voltage))
        self.current.put(self.model.sign() * st.rate)
        self.mode.put(st.mode)
        self.rate.put(float(st.rate))
        self.time.put(float(st.time))
        self.cycle.put(int(st.cycle))
        self.at_cutoff.put(int(self.model.at_cutoff))

    def trigger(self):
        dt = float(self.interval.get()) * (1 + float(self.jitter.get()) *
                                           (self._rng.random() - 0.5))
        self.truth.append(self.model.step(dt))
        self._publish()
        return NullStatus()
