"""The time bound on a frame's analysis.

Python cannot stop a computation running in another thread, so the bound is cooperative
and checked where an analysis can stop honestly: between frames (``RunAnalysis`` hands
an analysis its batch in chunks and checks the batch's budget before each chunk) and,
in analyses that time their per-frame stages (``BraggPeaks``: peak finding), after
each frame. What is cut off is recorded per frame as an error saying so, and the analysis
run ends with ``exit_status="fail"``: never a scan stalled behind one pathological frame,
never a frame silently dropped.
"""

from __future__ import annotations

import time


class TimeBudget:
    """``per_frame`` seconds for each of a batch's ``n`` frames, from now."""

    def __init__(self, per_frame: float, n: int):
        self.per_frame = float(per_frame)
        self.n = int(n)
        self.done = 0  # frames of the batch analysed (or cut) before the chunk in hand
        self.t0 = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def exceeded(self) -> bool:
        """The batch has used more than ``per_frame`` × its frames."""
        return self.elapsed > self.per_frame * self.n

    def batch_message(self, in_chunk: int = 0) -> str:
        """For a frame not analysed, after ``in_chunk`` frames of the chunk in hand."""
        done = self.done + in_chunk
        return (f"not analysed: the analysis exceeded {self.per_frame:g} s per frame "
                f"({self.elapsed:.3g} s for {done} of the {self.n} frames handed over together);"
                " raise XRDMLCallback(frame_time_limit=...) or make the analysis lighter")

    def frame_message(self, stage: str, seconds: float, hint: str = "") -> str:
        return (f"analysis exceeded {self.per_frame:g} s ({stage} alone took {seconds:.3g} s); "
                f"cut off here{': ' + hint if hint else ''}. Raise "
                "XRDMLCallback(frame_time_limit=...) if such frames are expected")


def chunks(items: list, size: int):
    """``items`` in consecutive runs of at most ``size``."""
    for i in range(0, len(items), size):
        yield items[i:i + size]
