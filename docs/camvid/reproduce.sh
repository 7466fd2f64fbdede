#!/usr/bin/env bash
# CamVid on one CUDA GPU in one command of at most 10 minutes (docs/camvid.md).
#
#   docs/camvid/pack.py --out data/camvid_gpu.tar        # once, here: 38 MiB of JPEGs + masks
#   OUT=/some/folder docs/camvid/reproduce.sh             # on the GPU machine, from the repo root
#
# In this order, each step under a time guard of its own, writing what it measures:
#   1. unpack the data, build the decoded cache (train, val);
#   2. the training step with the heads' upsampling by F.interpolate vs by matrix products, at
#      16 x 352x480 and 8 x 1024x1024 (tools/benchmark.py); the runs below use the faster one
#      at 352x480;
#   3. probes: the recipe for PROBE_ITERS iterations alone, then PROBE_JOBS copies side by side;
#   4. the plan (docs/camvid/plan.py): jobs side by side or not, seeds, iterations, from the
#      probes' speeds and the time left;
#   5. the camvid_ohem recipe run and the comparison (tools/compare.py, losses
#      ohem/ce/focal/ghm, paired-bootstrap report on val) at the same time on the one GPU;
#   6. the recipe's best.pt on val and test; each comparison run's last.pt on test;
#   7. always, even after a failed or killed step: $OUT/camvid_results.tar.gz (reports, logs,
#      metrics, plan, benchmark) and $OUT/camvid_ohem_best.pt (the recipe's best weights and
#      config, no optimizer state: tools/eval.py reads it).
#
# Settings (environment): OUT (required), BUDGET_S (seconds for everything, default 540),
# DATA (a tar from pack.py or a CamVid folder; default data/camvid_gpu.tar), WORK (default
# /tmp/camvid_work), PYTHON (default python3), DRY_RUN=1 (the same path on the CPU at a tiny
# size: batch 2, 64x96 crops, val at 90x120, to check the script before a GPU run).
set -uo pipefail

: "${OUT:?set OUT to the folder that receives the results}"
BUDGET_S=${BUDGET_S:-540}
DATA=${DATA:-data/camvid_gpu.tar}
WORK=${WORK:-/tmp/camvid_work}
PY=${PYTHON:-python3}
PROBE_JOBS=${PROBE_JOBS:-4}
T0=$(date +%s)

if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu
    SIZES='[[2,64,96]]'
    BATCH=2
    PROBE_ITERS=12
    TINY=(trainer.device=cpu trainer.amp=off loader.batch_size=2 'dataset.crop_size=[64,96]'
          'dataset.val.transform.resize=[90,120]' trainer.log_interval=2 loader.num_workers=1)
    RESERVE_S=${RESERVE_S:-150}
    PROBE_WORKERS=1
    BENCH=(repeats=2 warmup=1)
else
    DEVICE=cuda
    SIZES='[[16,352,480],[8,1024,1024]]'
    BATCH=16
    PROBE_ITERS=80
    TINY=(trainer.log_interval=10)
    RESERVE_S=${RESERVE_S:-110}  # after training: report, test evaluations, packing
    PROBE_WORKERS=$(( 16 / PROBE_JOBS ))
    BENCH=(repeats=10 warmup=3)
fi

mkdir -p "$WORK/logs" "$OUT"
STEPS="$WORK/steps.md"
echo "| step | exit status | seconds | limit |" > "$STEPS"
echo "|---|---|---|---|" >> "$STEPS"

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

# run_step NAME LIMIT_S CMD...: one step under its own time guard, logged to logs/NAME.log.
run_step() {
    local name=$1 limit=$2 start rc
    shift 2
    if [ "$limit" -lt 5 ]; then
        echo "| $name | not run (no time left) | 0 | $limit |" >> "$STEPS"
        return 124
    fi
    start=$(date +%s)
    timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
    echo "| $name | $rc | $(( $(date +%s) - start )) | $limit |" >> "$STEPS"
    return $rc
}

collect() {
    # The recipe's best weights without optimizer state, then everything small in one archive.
    local best="$WORK/recipe/checkpoints/best.pt"
    [ -f "$best" ] || best="$WORK/recipe/checkpoints/last.pt"
    if [ -f "$best" ]; then
        "$PY" - "$best" "$OUT/camvid_ohem_best.pt" <<'EOF' >> "$WORK/logs/collect.log" 2>&1
import sys, torch
src, dst = sys.argv[1], sys.argv[2]
ckpt = torch.load(src, map_location="cpu", weights_only=True)
drop = ("optimizer", "scheduler", "scaler", "rng", "loss")  # training state, not weights
keep = {k: v for k, v in ckpt.items() if k not in drop}
# Evaluation never runs the auxiliary heads: without them the weights fit the 16 MiB that a
# file coming back from the GPU machine may have (12.8 MiB against 20.0 MiB with them).
keep["model"] = {k: v for k, v in keep["model"].items() if not k.startswith("aux_heads.")}
torch.save(keep, dst + ".tmp")
import os; os.replace(dst + ".tmp", dst)
print(f"{dst}: iteration {keep.get('iteration')}, {os.path.getsize(dst) / 2**20:.1f} MiB")
EOF
    fi
    echo "total $(elapsed) s of $BUDGET_S" >> "$STEPS"
    tar -C "$WORK" -czf "$OUT/camvid_results.tar.gz" \
        --exclude='*.pt' --exclude='cache' --exclude='data' --exclude='*.npz' \
        --exclude='events.out.tfevents.*' . 2>/dev/null
}
trap collect EXIT

# 1. Data and the decoded cache.
if [ -f "$DATA" ]; then
    mkdir -p "$WORK/data"
    run_step unpack 60 tar -xf "$DATA" -C "$WORK/data"
    ROOT="$WORK/data/camvid"
else
    ROOT="$DATA"
fi
DATASET=(dataset=camvid "dataset.root=$ROOT" "dataset.cache=$WORK/cache")
run_step cache 90 "$PY" tools/build_cache.py "${DATASET[@]}" progress=false

# 2. The heads' upsampling, side by side at two sizes.
run_step bench 150 "$PY" tools/benchmark.py device=$DEVICE sections=[train_step] \
    train_step.groups=[head_upsample] "train_step.sizes=$SIZES" "${BENCH[@]}" \
    out="$WORK/bench"
UPSAMPLE=$("$PY" - "$WORK/bench/results.json" <<'EOF' 2>/dev/null || echo interpolate
import json, sys
records = json.load(open(sys.argv[1]))["sections"][0]["records"]
first = (records[0]["extra"]["height"], records[0]["extra"]["width"])
times = {r["name"]: r["median_ms"] for r in records
         if (r["extra"]["height"], r["extra"]["width"]) == first}
best = min(times, key=times.get)
print("matmul" if "matmul" in best else "interpolate")
EOF
)
echo "head_upsample: $UPSAMPLE" >> "$STEPS"

RECIPE=(+experiment=camvid_ohem "${DATASET[@]}" "model.head_upsample=$UPSAMPLE" "${TINY[@]}")

# 3. Probes: one job alone, then PROBE_JOBS side by side.
PROBE=("${RECIPE[@]}" trainer.max_iters=$PROBE_ITERS schedule.warmup_iters=$(( PROBE_ITERS / 4 ))
       trainer.eval_interval=100000 trainer.ckpt_interval=100000)
run_step probe_alone 150 "$PY" tools/train.py "${PROBE[@]}" hydra.run.dir="$WORK/probe/alone"
together=()
probe_start=$(date +%s)
for i in $(seq 1 "$PROBE_JOBS"); do
    together+=("$WORK/probe/together_$i")
    timeout -k 15 180 "$PY" tools/train.py "${PROBE[@]}" \
        loader.num_workers=$PROBE_WORKERS hydra.run.dir="$WORK/probe/together_$i" \
        > "$WORK/logs/probe_together_$i.log" 2>&1 &
done
wait
echo "| probe_together ($PROBE_JOBS jobs) | - | $(( $(date +%s) - probe_start )) | 180 |" >> "$STEPS"

# 4. The plan for the time left.
TRAIN_LEFT=$(( $(left) - RESERVE_S ))
if ! PLAN=$("$PY" docs/camvid/plan.py --left "$TRAIN_LEFT" --alone "$WORK/probe/alone" \
        --together "${together[@]}" --batch "$BATCH" 2> "$WORK/logs/plan.log"); then
    echo "plan failed (logs/plan.log): nothing trained" >> "$STEPS"
    exit 1
fi
echo "$PLAN" > "$WORK/plan.txt"
eval "$(echo "$PLAN" | grep -v '^#')"
echo "plan: $(tr '\n' ' ' < "$WORK/plan.txt")" >> "$STEPS"

# 5. The recipe run and the comparison, at the same time when the plan says so. The recipe's
# 200 warm-up iterations stay unless a budget is under 2000 iterations (then a tenth of it).
warmup() { if [ "$1" -lt 2000 ]; then echo $(( $1 / 10 )); else echo 200; fi; }
WORKERS=$(( 16 / SLOTS ))
[ "$DEVICE" = cpu ] && WORKERS=1
recipe_cmd=("$PY" tools/train.py "${RECIPE[@]}" trainer.max_iters=$RECIPE_ITERS
            schedule.warmup_iters=$(warmup "$RECIPE_ITERS") loader.num_workers=$WORKERS
            hydra.run.dir="$WORK/recipe")
compare_cmd=("$PY" tools/compare.py "${RECIPE[@]}" losses=[ohem,ce,focal,ghm] "seeds=[$SEEDS]"
             trainer.max_iters=$COMPARE_ITERS schedule.warmup_iters=$(warmup "$COMPARE_ITERS")
             loader.num_workers=$WORKERS hydra.run.dir="$WORK/compare")
TRAIN_LIMIT=$(( $(left) - RESERVE_S + 60 ))
if [ "$SLOTS" -ge 2 ]; then
    compare_cmd+=(hydra/launcher=joblib hydra.launcher.n_jobs=$(( SLOTS - 1 )))
    run_step recipe "$TRAIN_LIMIT" "${recipe_cmd[@]}" &
    recipe_pid=$!
    run_step compare "$TRAIN_LIMIT" "${compare_cmd[@]}"
    wait "$recipe_pid"
else
    run_step recipe $(( TRAIN_LIMIT * 3 / 10 + 30 )) "${recipe_cmd[@]}"
    run_step compare $(( $(left) - RESERVE_S + 60 )) "${compare_cmd[@]}"
fi

# 6. Evaluations: the recipe's best.pt on val and test, then each comparison run on test.
BEST="$WORK/recipe/checkpoints/best.pt"
run_step eval_recipe_val $(( $(left) - 30 )) "$PY" tools/eval.py ckpt="$BEST" \
    out="$WORK/recipe/eval_val"
run_step eval_recipe_test $(( $(left) - 30 )) "$PY" tools/eval.py ckpt="$BEST" \
    dataset.split=test out="$WORK/recipe/eval_test"
runs=$(ls "$WORK"/compare/*/checkpoints/last.pt 2>/dev/null | paste -sd, -)
if [ -n "$runs" ]; then
    run_step eval_compare_test $(( $(left) - 20 )) "$PY" tools/eval.py -m "ckpt=$runs" \
        dataset.split=test
    for run in "$WORK"/compare/*/; do
        [ -f "$run/checkpoints/metrics.json" ] && cp "$run/checkpoints/metrics.json" "$run/test_metrics.json"
    done
fi
exit 0
