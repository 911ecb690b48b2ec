#!/usr/bin/env bash
# Does a change keep behaviour? Trains criteria, evidence and joint (--max_steps 60) with configs/reproducible.yaml
# at two commits and compares their metrics.json byte for byte with cmp.
#   scripts/same_metrics.sh 10d796e HEAD [extra train.py flags]
set -euo pipefail
old=$1 new=$2
shift 2
root=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'git -C "$root" worktree remove --force "$work/old" >/dev/null 2>&1; git -C "$root" worktree remove --force "$work/new" >/dev/null 2>&1; rm -rf "$work"' EXIT
for side in old new; do
    git -C "$root" worktree add -q --detach "$work/$side" "${!side}"
done
status=0
for task in criteria evidence joint; do
    steps=(); [ "$task" = joint ] && steps=(--max_steps 60)
    for side in old new; do
        (cd "$work/$side" && python train.py --config configs/reproducible.yaml --task "$task" "${steps[@]}" \
            --mlflow false --output_dir "$work/out-$side-$task" "$@" > "$work/$side-$task.log" 2>&1) \
            || { echo "$task: the $side run failed:"; tail -3 "$work/$side-$task.log"; exit 1; }
    done
    if cmp "$work/out-old-$task/metrics.json" "$work/out-new-$task/metrics.json"; then
        echo "$task: metrics.json identical ($(wc -c < "$work/out-new-$task/metrics.json") bytes)"
    else
        status=1
    fi
done
exit $status
