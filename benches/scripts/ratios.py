#!/usr/bin/env python3
"""Runs `mosaic-bench transport --peer --json` several times and prints, per figure, the median
of ours, of the peer and of the per-run ratio (ours / peer), so a noisy machine does not decide a
comparison by one unlucky run.

usage: benches/scripts/ratios.py RUNS [mosaic-bench transport arguments...]
"""
import json
import statistics
import subprocess
import sys

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
extra = sys.argv[2:]
import os
cmd = [os.environ.get("MOSAIC_BENCH", "target/release/mosaic-bench"), "transport", "--peer", "--json", *extra]
rows = {}
for i in range(runs):
    print(f"run {i + 1}/{runs}: {' '.join(cmd)}", file=sys.stderr)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = json.loads(line)
        key = (f["transport"], f.get("protection", "-"), f["op"], f["size"], f["outstanding"])
        rows.setdefault(key, []).append(f)

def med(fs, k):
    vals = [f[k] for f in fs if k in f]
    return statistics.median(vals) if vals else None

print(f"{'transport':<9} {'frames':<9} {'op':<10} {'size':>7} {'out':>4} {'median_us':>10} {'MB/s':>9} {'pages/s':>10}  peer, median ratio (range)")
for (t, prot, op, size, out), fs in rows.items():
    ours_us, mbs, pps = med(fs, "median_us"), med(fs, "mb_per_s"), med(fs, "pages_per_s")
    ratios = [f["ratio"] for f in fs if "ratio" in f]
    peer = ""
    if ratios:
        pm = med(fs, "peer_median_us")
        pb = med(fs, "peer_mb_per_s")
        pv = f"{pm:.2f} us" if pm is not None else f"{pb:.0f} MB/s"
        peer = f"{fs[0]['peer']} {pv}, x{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
    print(f"{t:<9} {prot:<9} {op:<10} {size:>7} {out:>4} {fmt(ours_us, 2):>10} {fmt(mbs, 0):>9} {fmt(pps, 0):>10}  {peer}")
