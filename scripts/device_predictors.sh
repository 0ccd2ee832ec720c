#!/usr/bin/env bash
# Predictors on the device (issue #3): profile calib.txt once with the training set, train predictors for a few
# settings, evaluate each on wiki-dev (never seen in training), copy the best one back. Logs and JSON go to $OUT;
# the last lines printed are one summary line per setting.
# Run from the repo root after `source scripts/device_env.sh`. Everything else comes from the environment:
#   MODEL (/tmp/relu-smollm2), DATA_DIR (/tmp/data, holding calib.txt and wiki-dev.txt), TOKENS (100000, the
#   train-predictors default), EVAL_DOCS (empty: all of wiki-dev), DEVICE (cuda), DTYPE (float32: the numbers
#   then match the CPU's), PYTHON (python3), WORK (/tmp/predictors-work: profile and predictor folders, several
#   GB, kept out of $OUT), STEP_TIMEOUT (seconds per step, 150), TIME_LIMIT (seconds for all steps, 390: a step
#   gets at most what is left, a setting is skipped when under 20 s are), SETTINGS ('|'-separated NAME:ARGS
#   for train-predictors, most wanted first), POWERINFER_COMMIT (the commit to name: the device has no .git).
# Local dry run (CPU, demo model):
#   mkdir -p /tmp/dd && cp powerinfer_py/demo_model/calib.txt /tmp/dd/ && cp powerinfer_py/demo_model/heldout.txt /tmp/dd/wiki-dev.txt
#   OUT=/tmp/dd-out MODEL=powerinfer_py/demo_model DATA_DIR=/tmp/dd TOKENS=8192 EVAL_DOCS=20 DEVICE=cpu \
#     PYTHON=.venv/bin/python bash scripts/device_predictors.sh
set -uo pipefail
: "${OUT:?set OUT to the folder for logs and JSON}"
MODEL=${MODEL:-/tmp/relu-smollm2}
DATA_DIR=${DATA_DIR:-/tmp/data}
TOKENS=${TOKENS:-100000}
EVAL_DOCS=${EVAL_DOCS:-}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float32}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/predictors-work}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
TIME_LIMIT=${TIME_LIMIT:-390}
# The bound on each layer's missed-activation error (the default first; inf: recall alone sets the thresholds),
# then twice the rank (19% of the FFN's parameters, over the 10% target) to show what width buys.
SETTINGS=${SETTINGS:-"err-7e-5:--max-error 7e-5|err-1e-4:--max-error 1e-4|err-5e-5:--max-error 5e-5|err-inf:--max-error inf|rank240:--max-error 7e-5 --max-rank 240"}

export PYTHONPATH=${PYTHONPATH:-}:$PWD
PI=("$PYTHON" -m powerinfer_py.cli)
LOAD=(-m "$MODEL" --device "$DEVICE" --dtype "$DTYPE")
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK" || exit 1
: > "$OUT/steps.jsonl"

# step NAME CMD...: run CMD for at most STEP_TIMEOUT (or what is left of TIME_LIMIT) with stdout to
# $OUT/NAME.out, stderr to $OUT/NAME.log; append its exit status and wall seconds to $OUT/steps.jsonl.
step() {
    local name=$1; shift
    local t0 t1 rc limit=$(( TIME_LIMIT - SECONDS < STEP_TIMEOUT ? TIME_LIMIT - SECONDS : STEP_TIMEOUT ))
    t0=$(date +%s.%N)
    timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.log"
    rc=$?
    t1=$(date +%s.%N)
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(awk "BEGIN {print $t1 - $t0}")}" >> "$OUT/steps.jsonl"
    echo "$name: exit $rc, $(awk "BEGIN {printf \"%.1f\", $t1 - $t0}") s" >&2
    [ $rc -eq 0 ] || tail -3 "$OUT/$name.log" >&2
    return $rc
}

echo "commit ${POWERINFER_COMMIT:-$(git describe --always --dirty 2>/dev/null || echo unknown)}; $(nproc) cores; $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no GPU)" | tee "$OUT/machine.txt"
step profile "${PI[@]}" profile "${LOAD[@]}" --data "$DATA_DIR/calib.txt" -o "$WORK/profile" --max-tokens "$TOKENS" \
    --dump-dataset || exit 1
cp "$WORK/profile/stats.json" "$OUT/profile-stats.json"

docs=()
[ -n "$EVAL_DOCS" ] && docs=(--max-docs "$EVAL_DOCS")
IFS='|' read -ra settings <<< "$SETTINGS"
for setting in "${settings[@]}"; do
    name=${setting%%:*}
    read -ra args <<< "${setting#*:}"
    [ $(( TIME_LIMIT - SECONDS )) -ge 20 ] || { echo "$name: skipped, under 20 s left" >&2; continue; }
    step "train-$name" "${PI[@]}" train-predictors "${LOAD[@]}" --data "$WORK/profile" -o "$WORK/pred-$name" "${args[@]}" \
        && cp "$WORK/pred-$name/train_report.json" "$OUT/train-$name.json" \
        && step "eval-$name" "${PI[@]}" eval "${LOAD[@]}" --data "$DATA_DIR/wiki-dev.txt" "${docs[@]}" \
            --predictors "$WORK/pred-$name" \
        && tail -1 "$OUT/eval-$name.out" > "$OUT/eval-$name.json"
done

# One line per setting. Chosen: among the settings within 10% of the FFN's parameters (all, if none is), the
# lowest mean ratio of those that keep perplexity within 1% of dense with mean recall >= 0.95 and min >= 0.90
# (else the lowest perplexity increase).
"$PYTHON" - "$OUT" "$SETTINGS" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys

out, names = sys.argv[1], [s.split(":", 1)[0] for s in sys.argv[2].split("|")]
steps = {s["step"]: s for s in map(json.loads, open(os.path.join(out, "steps.jsonl")))}
profile = json.load(open(os.path.join(out, "profile-stats.json")))
print(f"profile: {profile['tokens']} tokens in {steps['profile']['seconds']:.1f} s wall "
      f"({profile['seconds']:.1f} s profiling), mean sparsity {profile['mean_sparsity']:.3f}")
rows = []
for name in names:
    try:
        ev = json.load(open(os.path.join(out, f"eval-{name}.json")))
    except (OSError, ValueError):
        continue
    rows.append({"name": name, "mean_recall": ev["mean_recall"], "min_recall": ev["min_recall"],
                 "mean_ratio": ev["mean_active_ratio"], "overall_ratio": ev["overall_active_ratio"],
                 "param_share": ev["param_share"], "dense_ppl": ev["dense"]["ppl"], "sparse_ppl": ev["sparse"]["ppl"],
                 "ppl_increase": ev["ppl_increase"], "eval_tokens": ev["dense"]["tokens"],
                 "train_seconds": steps[f"train-{name}"]["seconds"], "eval_seconds": steps[f"eval-{name}"]["seconds"]})
budget = [r for r in rows if r["param_share"] <= 0.10] or rows
good = [r for r in budget if r["ppl_increase"] <= 0.01 and r["mean_recall"] >= 0.95 and r["min_recall"] >= 0.90]
best = min(good, key=lambda r: r["mean_ratio"]) if good else min(budget, key=lambda r: r["ppl_increase"], default=None)
for r in rows:
    print(f"{r['name']:>10}: recall mean {r['mean_recall']:.4f} min {r['min_recall']:.4f}, ratio mean "
          f"{r['mean_ratio']:.3f}x (overall {r['overall_ratio']:.3f}x), params {r['param_share']:.2%}, ppl "
          f"{r['dense_ppl']:.4f} -> {r['sparse_ppl']:.4f} ({r['ppl_increase']:+.2%}, {r['eval_tokens']} tokens), "
          f"train {r['train_seconds']:.1f} s, eval {r['eval_seconds']:.1f} s" + ("  <- chosen" if r is best else ""))
for name in sorted(set(names) - {r["name"] for r in rows}):
    print(f"{name:>10}: no result (its logs are in OUT)")
summary = {"settings": rows, "chosen": best and best["name"], "profile_seconds": steps["profile"]["seconds"],
           "profile_tokens": profile["tokens"]}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
EOF

chosen=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'] or '')" "$OUT/summary.json")
[ -n "$chosen" ] && cp -r "$WORK/pred-$chosen" "$OUT/predictors-default" && echo "copied $chosen to \$OUT/predictors-default"
