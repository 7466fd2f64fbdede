"""The CamVid reproduction's sizing (docs/camvid/plan.py): side by side or not, seeds, budgets."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PLAN_PATH = Path(__file__).resolve().parents[1] / "docs" / "camvid" / "plan.py"
spec = importlib.util.spec_from_file_location("camvid_plan", PLAN_PATH)
plan = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = plan  # dataclasses look their module up while the file runs
spec.loader.exec_module(plan)

EPOCH = 367 / 16  # CamVid train images / batch
FLOOR = math.ceil(100 * EPOCH)


def test_side_by_side_when_it_pays_and_the_trade_when_time_is_short() -> None:
    # 4 jobs at 200 img/s each = 2x one alone: 4 slots, the recipe holds one.
    p = plan.size_budget(420, 400, 200, 4, 16, EPOCH, 6900, overhead_s=45)
    assert p.slots == 4
    step = 16 / 200
    assert p.recipe_iters == int((420 - 45) / step)
    # 3 seeds: 12 runs in 4 waves of 3 fall under the floor, so 2 seeds: 8 runs in 3 waves.
    assert p.seeds == 2
    assert p.compare_iters == int((420 - 3 * 45) / (3 * step))
    assert p.below_floor and p.compare_iters < FLOOR
    assert any("BELOW" in note for note in p.notes)
    assert "SEEDS=0,1" in p.shell() and f"COMPARE_ITERS={p.compare_iters}" in p.shell()


def test_three_seeds_at_the_floor_or_more_when_time_allows() -> None:
    p = plan.size_budget(3000, 400, 300, 4, 16, EPOCH, 6900, overhead_s=45)
    assert (p.slots, p.seeds, p.below_floor) == (4, 3, False)
    assert p.compare_iters >= FLOOR
    assert p.recipe_iters == 6900  # capped at the recipe's own budget
    assert "SEEDS=0,1,2" in p.shell()


def test_one_at_a_time_when_side_by_side_does_not_pay() -> None:
    p = plan.size_budget(3000, 400, 105, 4, 16, EPOCH, 6900, overhead_s=45)
    assert p.slots == 1  # 4 x 105 = 1.05x one alone, under the 1.15x gain asked for
    step = 16 / 400
    assert p.recipe_iters == 6900  # its own budget ends before its 30% share of the window
    recipe_window = 6900 * step + 45
    waves = 4 * p.seeds
    assert p.compare_iters == int((3000 - recipe_window - waves * 45) / (waves * step))
    short = plan.size_budget(1000, 400, 105, 4, 16, EPOCH, 6900, overhead_s=45)
    assert short.recipe_iters == int((0.3 * 1000 - 45) / step)  # the 30% share binds


def test_speed_from_train_log_skips_warm_up(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    speeds = [5.0, 50.0, 100.0, 110.0, 90.0]
    log.write_text(
        "".join(
            f"[x] iter {10 * i}/80 | loss 1.0 (a) | lr 1e-3 | {s} img/s | eta 1:00 | non-finite 0\n"
            for i, s in enumerate(speeds, 1)
        )
    )
    assert plan.speed_from_log(log) == 100.0
    log.write_text("iter 10/80 | loss 1.0 (a) | lr 1e-3 | 9.0 img/s | eta 1:00\n")
    with pytest.raises(SystemExit, match="1 speed lines"):
        plan.speed_from_log(log)


def test_no_time_left_is_refused() -> None:
    with pytest.raises(SystemExit, match="nothing worth training"):
        plan.size_budget(100, 20, 0.3, 2, 2, 183.5, 6900, overhead_s=45)
