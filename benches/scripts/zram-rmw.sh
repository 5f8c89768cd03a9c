#!/usr/bin/env bash
# The local baseline for `mosaic-bench netram`'s rmw figures: the same read-modify-write loop on
# ordinary memory, under a cgroup v1 memory limit with swap to zram (benches/scripts/zram-run.sh),
# so the kernel swaps what does not fit.
#
#   benches/scripts/zram-rmw.sh SIZE_MIB RESIDENT_PCT SECONDS
#
# The limit is RESIDENT_PCT of SIZE_MIB plus the process's own baseline (measured first, with a
# 1 MiB working set), so only the working set competes for the limited memory. Prints the
# mosaic-bench JSON line with "limit_bytes", "baseline_kib", "swap", "resident_pct" and "attempts" added.
set -euo pipefail
size_mib=${1:?SIZE_MIB}; pct=${2:?RESIDENT_PCT}; secs=${3:-5}
bench=${MOSAIC_BENCH:-target/release/mosaic-bench}
here=$(dirname "$0")

# The process's baseline resident memory with a trivial working set.
base_kib=$( /usr/bin/time -f %M "$bench" rmw --size 1M --time 0.2 2>&1 >/dev/null | tail -1 )
limit=$(( size_mib * 1048576 * pct / 100 + base_kib * 1024 ))
# The kernel's reclaim sometimes loses the race with the workload's first fill under so tight a
# limit, and the cgroup's OOM killer ends the run (4 of 9 runs in one series on 2026-12-02, none
# of their re-runs): try up to three times, saying so ("attempts" in the JSON line).
out=
for attempt in 1 2 3; do
  if out=$( bash "$here/zram-run.sh" "$limit" $(( size_mib * 2 )) "$bench" rmw --size "${size_mib}M" --time "$secs" 2> >(grep -v "^zram-run: [0-9]" >&2) ); then
    break
  fi
  out=
  echo "zram-rmw: attempt $attempt of 3 failed; $([ "$attempt" -lt 3 ] && echo "trying again" || echo "giving up")" >&2
  sleep 1
done
[ -n "$out" ] || exit 1
echo "${out%\}},\"limit_bytes\":$limit,\"baseline_kib\":$base_kib,\"swap\":\"zram\",\"resident_pct\":$pct,\"attempts\":$attempt}"
