#!/usr/bin/env python3
"""Two builds of `mosaic-bench dsm` side by side, on an idle machine or with every CPU kept busy.

    benches/scripts/dsm_under_load.py --before OLD/mosaic-bench --after NEW/mosaic-bench \
        [--rounds 5] [--load idle|busy] [--transport shm|tcp] [--nodes 2]

Runs the two binaries alternately, `--rounds` times each (2 nodes, 300 samples per figure), and
prints, per figure, the median of the per-run medians and their range. With `--load busy` one
`yes > /dev/null` per CPU runs meanwhile (one CPU-bound process per core, the normal state of an
HPC node) and is stopped at the end, whatever happens.
"""
import argparse
import json
import os
import statistics
import subprocess

OPS = ["read_miss", "write_upgrade", "lock", "lock_handoff", "barrier"]


def run(exe, transport, nodes):
    out = subprocess.run(
        [exe, "dsm", "--nodes", str(nodes), "--transports", transport, "--samples", "300", "--time", "0.1", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    got = {}
    for line in out.splitlines():
        try:
            v = json.loads(line)
        except ValueError:
            continue
        if v.get("bench") == "dsm" and v.get("transport") == transport and v.get("op") in OPS and v.get("nodes") == nodes:
            got.setdefault(v["op"], v["median_us"])
    return got


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--load", choices=["idle", "busy"], default="idle")
    ap.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    ap.add_argument("--nodes", type=int, default=2)
    a = ap.parse_args()
    builds = {"before": a.before, "after": a.after}
    res = {k: {op: [] for op in OPS} for k in builds}
    hogs = []
    try:
        if a.load == "busy":
            hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(os.cpu_count() or 1)]
        for _ in range(a.rounds):
            for k, exe in builds.items():
                for op, v in run(exe, a.transport, a.nodes).items():
                    res[k][op].append(v)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    print(f"{a.load}, {a.transport}, {a.nodes} nodes, {a.rounds} rounds: median (min-max) of the per-run medians, us")
    for k in builds:
        cells = [f"{op} {statistics.median(x):.1f} ({min(x):.1f}-{max(x):.1f})" for op, x in res[k].items() if x]
        print(f"  {k:7s}", "  ".join(cells))


if __name__ == "__main__":
    main()
