#!/usr/bin/env bash
# The local baseline for `mosaic-bench netram`'s rmw figures: the same read-modify-write loop on
# ordinary memory, under a cgroup v1 memory limit with swap to zram, so the kernel swaps what does
# not fit. Needs root, /sys/block/zram0 and the cgroup v1 memory controller.
#
#   benches/scripts/zram-rmw.sh SIZE_MIB RESIDENT_PCT SECONDS
#
# The limit is RESIDENT_PCT of SIZE_MIB plus the process's own baseline (measured first, with a
# 1 MiB working set), so only the working set competes for the limited memory. Prints the
# mosaic-bench JSON line with "limit_bytes" and "swap" added.
set -euo pipefail
size_mib=${1:?SIZE_MIB}; pct=${2:?RESIDENT_PCT}; secs=${3:-5}
bench=${MOSAIC_BENCH:-target/release/mosaic-bench}
cg=/sys/fs/cgroup/memory/mosaic-zram-$$
zram=/sys/block/zram0

cleanup() {
  swapoff /dev/zram0 2>/dev/null || true
  echo 1 > $zram/reset 2>/dev/null || true
  [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT

[ -d $zram ] || { echo "no /sys/block/zram0 (load the zram module)" >&2; exit 1; }
[ -d /sys/fs/cgroup/memory ] || { echo "no cgroup v1 memory controller" >&2; exit 1; }
swapoff /dev/zram0 2>/dev/null || true
echo 1 > $zram/reset
echo $(( size_mib * 2 ))M > $zram/disksize
mkswap /dev/zram0 >/dev/null
swapon /dev/zram0

# The process's baseline resident memory with a trivial working set.
base_kib=$( /usr/bin/time -f %M "$bench" rmw --size 1M --time 0.2 2>&1 >/dev/null | tail -1 )
limit=$(( size_mib * 1048576 * pct / 100 + base_kib * 1024 ))
mkdir "$cg"
echo "$limit" > "$cg/memory.limit_in_bytes"
echo 100 > "$cg/memory.swappiness" 2>/dev/null || true
out=$( sh -c "echo \$\$ > $cg/cgroup.procs; exec $bench rmw --size ${size_mib}M --time $secs" )
echo "${out%\}},\"limit_bytes\":$limit,\"baseline_kib\":$base_kib,\"swap\":\"zram\",\"resident_pct\":$pct}"
