"""Training progress: plain lines when the output is not a terminal (a log file, a batch
job), periodic rather than one per step, each with the count, loss, elapsed and ETA."""

import re

from bluesky_xrdml.training.progress import TrainingProgress, duration


def test_plain_lines_are_periodic_and_say_how_far_and_how_long():
    lines = []
    with TrainingProgress("PQ-Net", total=100, unit="step", log=lines.append,
                          terminal=False, every_s=3600) as p:
        for step in range(1, 101):
            p.update(step, info=f"mse {1 / step:.4f}")
    # the first update and the last, none in between: the clock never reached every_s
    assert len(lines) == 2, lines
    assert re.fullmatch(r"PQ-Net: step 1/100 \| mse 1\.0000 \| \d+s elapsed, ~\S+ left", lines[0])
    assert lines[1].startswith("PQ-Net: step 100/100 | mse 0.0100 |")
    assert lines[1].endswith("~0s left")


def test_every_update_gives_a_line_when_the_period_is_zero_or_forced():
    lines = []
    with TrainingProgress("BraggNN", total=3, unit="epoch", log=lines.append,
                          terminal=False, every_s=0) as p:
        for epoch in range(3):
            p.update(epoch + 0.5, info="mid-epoch")
            p.update(epoch + 1, info="end of epoch", force=True)
    assert len(lines) == 6
    assert lines[0].startswith("BraggNN: epoch 0.5/3 | mid-epoch")
    assert lines[5].startswith("BraggNN: epoch 3/3 | end of epoch")


def test_a_terminal_gets_the_bar_and_disabled_progress_gets_nothing():
    for terminal, enabled in ((True, True), (False, False)):
        lines = []
        with TrainingProgress("x", total=2, log=lines.append, terminal=terminal,
                              enabled=enabled, every_s=0) as p:
            p.update(1)
            p.update(2)
        assert lines == []


def test_the_time_left_is_bounded_by_the_time_budget():
    p = TrainingProgress("x", total=1000, log=None, terminal=False, budget_s=60)
    p.t0 -= 30  # 30 s in, 1 % done: 50 min at this pace, but the budget ends in 30 s
    assert 29 <= p.eta(10) <= 30
    assert duration(3725) == "1h02m" and duration(125) == "2m05s" and duration(4.4) == "4s"
