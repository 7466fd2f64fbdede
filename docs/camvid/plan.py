"""Size the CamVid reproduction (docs/camvid/reproduce.sh) to the time that is left.

The script first times short probe runs of the recipe: one job alone, then ``n`` jobs side
by side on the one GPU. This file reads their train.log speeds and decides:

- how many jobs share the GPU: ``n`` when together they train at least
  ``PARALLEL_GAIN`` x the images per second of one job alone, else 1;
- with ``n`` jobs: the ``camvid_ohem`` recipe run holds one of them for the whole window,
  the comparison (4 losses x seeds) the other ``n - 1``, in waves; with one job, the recipe
  gets ``RECIPE_SHARE_ALONE`` of the window and the comparison's runs the rest, one by one;
- the comparison's budget in iterations: the largest that fits with 3 seeds when that is at
  least ``FLOOR_EPOCHS`` epochs, else with 2 seeds (the trade named in the plan), else what
  fits with 2 seeds, flagged as below the floor. The recipe's budget: what its slot holds,
  at most its own ``trainer.max_iters``.

    python docs/camvid/plan.py --left 420 --alone RUN_DIR --together RUN_DIR RUN_DIR RUN_DIR RUN_DIR

prints shell assignments (``SLOTS=3`` ...) for the script and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

#: Jobs side by side must train this much faster together than one alone to be worth it.
PARALLEL_GAIN = 1.15
#: The comparison's floor (issue: at least 100 epochs per run).
FLOOR_EPOCHS = 100
#: With one job at a time, the recipe run's share of the window.
RECIPE_SHARE_ALONE = 0.3
#: Seconds a training job spends outside its iterations: start-up (imports, model, cuDNN
#: autotuning), its periodic and final evaluations on the 101 val images, checkpoints.
JOB_OVERHEAD_S = 45.0
LOSSES = ("ohem", "ce", "focal", "ghm")
#: Fewer iterations than this for a run means the time is gone: the plan refuses.
MIN_ITERS = 10
SPEED = re.compile(r"\| ([0-9.]+) img/s \|")


def speed_from_log(log: Path, skip: int = 2) -> float:
    """Median images/s of a run's train.log lines, leaving out the first ``skip`` (warm-up)."""
    values = [float(m.group(1)) for m in SPEED.finditer(log.read_text(errors="replace"))]
    if len(values) <= skip:
        raise SystemExit(f"error: {log} has {len(values)} speed lines, need more than {skip}")
    return statistics.median(values[skip:])


@dataclass
class Plan:
    slots: int  # jobs side by side on the GPU
    seeds: int  # seeds of the comparison
    compare_iters: int
    recipe_iters: int
    compare_epochs: float
    recipe_epochs: float
    below_floor: bool
    notes: list[str]

    def shell(self) -> str:
        seeds = ",".join(str(s) for s in range(self.seeds))
        return "\n".join(
            [
                f"SLOTS={self.slots}",
                f"SEEDS={seeds}",
                f"COMPARE_ITERS={self.compare_iters}",
                f"RECIPE_ITERS={self.recipe_iters}",
                f"PLAN_NOTE={' '.join(self.notes)!r}",
            ]
        )


def size_budget(
    left_s: float,
    alone_ips: float,
    together_ips: float,
    together_jobs: int,
    batch: int,
    epoch_iters: float,
    recipe_max_iters: int,
    overhead_s: float = JOB_OVERHEAD_S,
) -> Plan:
    """The plan for ``left_s`` seconds of training.

    ``alone_ips``: images/s of one job alone; ``together_ips``: images/s of EACH of
    ``together_jobs`` jobs run side by side; ``epoch_iters``: iterations per epoch.
    """
    notes: list[str] = []
    gain = together_ips * together_jobs / alone_ips
    parallel = together_jobs >= 2 and gain >= PARALLEL_GAIN
    slots = together_jobs if parallel else 1
    step_s = batch / (together_ips if parallel else alone_ips)
    notes.append(
        f"{together_jobs} jobs side by side train {gain:.2f}x the images/s of one alone: "
        f"{'side by side' if parallel else 'one at a time'}, {step_s * 1000:.0f} ms a step."
    )
    floor_iters = math.ceil(FLOOR_EPOCHS * epoch_iters)
    if parallel:
        recipe_window = left_s
        compare_slots = slots - 1
        compare_window = left_s
    else:
        # The recipe's share, or less when its own budget ends sooner (the rest is compared).
        recipe_window = min(RECIPE_SHARE_ALONE * left_s, recipe_max_iters * step_s + overhead_s)
        compare_slots = 1
        compare_window = left_s - recipe_window
    recipe_iters = int(min(recipe_max_iters, max(0.0, recipe_window - overhead_s) / step_s))

    def fits(seeds: int) -> int:
        waves = math.ceil(len(LOSSES) * seeds / compare_slots)
        return int(max(0.0, compare_window - waves * overhead_s) / (waves * step_s))

    seeds = 3
    compare_iters = fits(3)
    if compare_iters < floor_iters:
        seeds = 2
        compare_iters = fits(2)
        notes.append(
            f"3 seeds would give {fits(3)} iterations a run, under the {FLOOR_EPOCHS}-epoch "
            f"floor ({floor_iters}): 2 seeds."
        )
    if min(compare_iters, recipe_iters) < MIN_ITERS:
        raise SystemExit(
            f"error: {left_s:.0f} s leave {compare_iters} iterations a comparison run and "
            f"{recipe_iters} for the recipe at {step_s * 1000:.0f} ms a step: nothing worth training"
        )
    below = compare_iters < floor_iters
    if below:
        notes.append(
            f"2 seeds give {compare_iters} iterations a run ({compare_iters / epoch_iters:.0f} "
            f"epochs): BELOW the {FLOOR_EPOCHS}-epoch floor; the comparison is run anyway."
        )
    return Plan(
        slots=slots,
        seeds=seeds,
        compare_iters=compare_iters,
        recipe_iters=recipe_iters,
        compare_epochs=compare_iters / epoch_iters,
        recipe_epochs=recipe_iters / epoch_iters,
        below_floor=below,
        notes=notes,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--left", type=float, required=True, help="seconds for training")
    parser.add_argument("--alone", type=Path, required=True, help="probe run folder, one job")
    parser.add_argument("--together", type=Path, nargs="+", required=True, help="probe runs")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=367)
    parser.add_argument("--recipe-max-iters", type=int, default=6900)
    args = parser.parse_args(argv)
    alone = speed_from_log(args.alone / "train.log")
    together = statistics.median(speed_from_log(run / "train.log") for run in args.together)
    plan = size_budget(
        args.left,
        alone,
        together,
        len(args.together),
        args.batch,
        args.train_images / args.batch,
        args.recipe_max_iters,
    )
    print(plan.shell())
    print(
        f"# alone {alone:.1f} img/s; {len(args.together)} together {together:.1f} img/s each; "
        f"comparison {plan.compare_epochs:.0f} epochs x {plan.seeds} seeds, "
        f"recipe {plan.recipe_epochs:.0f} epochs",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
