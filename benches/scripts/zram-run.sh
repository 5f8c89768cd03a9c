#!/usr/bin/env bash
# Runs a command under a cgroup v1 memory limit with swap to zram (the kernel-swap baseline for
# mosrun), and prints its wall time. Needs root, /sys/block/zram0, the cgroup v1 memory controller.
#   benches/scripts/zram-run.sh LIMIT_BYTES SWAP_MIB CMD [ARGS...]
set -euo pipefail
limit=${1:?LIMIT_BYTES}; swap_mib=${2:?SWAP_MIB}; shift 2
cg=/sys/fs/cgroup/memory/mosaic-zram-run-$$
zram=/sys/block/zram0
cleanup() {
  swapoff /dev/zram0 2>/dev/null || true
  echo 1 > $zram/reset 2>/dev/null || true
  [ -d "$cg" ] && rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
swapoff /dev/zram0 2>/dev/null || true
echo 1 > $zram/reset
echo "${swap_mib}M" > $zram/disksize
mkswap /dev/zram0 >/dev/null
swapon /dev/zram0
mkdir "$cg"
echo "$limit" > "$cg/memory.limit_in_bytes"
echo 100 > "$cg/memory.swappiness" 2>/dev/null || true
start=$(date +%s.%N)
status=0
sh -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$cg" "$@" || status=$?
end=$(date +%s.%N)
if [ "$status" -ne 0 ]; then
  ooms=$(grep -s '^oom_kill ' "$cg/memory.oom_control" | awk '{print $2}')
  echo "zram-run: the command exited with status $status${ooms:+ (cgroup OOM kills: $ooms)}; a limit of $limit bytes may be too tight" >&2
  exit "$status"
fi
echo "zram-run: $(echo "$end - $start" | bc) s under a limit of $limit bytes" >&2
