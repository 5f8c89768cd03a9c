#!/usr/bin/env python3
"""Real programs, unmodified: plain, under mosrun, and under kernel swap to zram.

Runs a fixed set of programs (GNU sort -S, xz -9, a Python dict of millions of entries, a C
random read-modify-write loop, a C hash table made of small allocations) first plain, to
measure their peak RSS, then for each fraction of that peak (25% and 50% by default) under
`mosrun --local-budget` (tcp: its embedded loopback server; shm: a mosaic-memserver on shm://;
tcp-large-only: tcp with `--large-only`, small allocations left in glibc's heap) and under a
cgroup v1 memory limit of the same size with swap to zram. The netram-demo sort runs as its own figure (local and network RAM in one
process). Every run prints one JSON line: program, mode, limit, seconds, peak RSS of the program
(GNU time's %M), a checksum of its output, its exit status and the cgroup's OOM kills. A run that
passes --timeout is stopped and reported as timed out.

With --split-cpus the program (and its pager threads) runs on the last CPU and the memory
servers (mosrun's embedded one, or the shm mosaic-memserver) on the others, as if the servers
were other hosts; plain and zram runs get the program's CPU too (zram's kswapd may run anywhere,
as the kernel places it). Without it everything shares every CPU.

  python3 benches/scripts/programs.py [--scale S] [--fractions 0.25,0.5]
         [--modes plain,tcp,shm,zram,tcp-large-only] [--programs sort,xz,python,rmw,smallalloc,netram-demo] [--rounds N] [--timeout SECS] [--split-cpus] [--out FILE]

Needs root for zram (/sys/block/zram0, the cgroup v1 memory controller at
/sys/fs/cgroup/memory); without them the zram runs are reported as skipped. Build first:
`cargo build --release -p mosrun -p mosaic-preload -p mosaic-netram -p mosaic-examples`.
"""

import argparse
import datetime
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELEASE = os.path.join(ROOT, "target", "release")
TIME = "/usr/bin/time"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def text_file(path, mbytes):
    """Deterministic text of about `mbytes` MB: lines of pseudo-random words."""
    if os.path.exists(path) and os.path.getsize(path) >= mbytes * 1_000_000 * 0.99:
        return path
    words = [w.strip() for w in open("/usr/share/dict/words")] if os.path.exists("/usr/share/dict/words") else None
    x = 88172645463325252
    mask = (1 << 64) - 1
    with open(path, "w") as f:
        written = 0
        while written < mbytes * 1_000_000:
            parts = []
            for _ in range(8):
                x ^= (x << 13) & mask
                x ^= x >> 7
                x ^= (x << 17) & mask
                parts.append(words[x % len(words)] if words else format(x % 1_000_003, "x"))
            line = " ".join(parts) + "\n"
            f.write(line)
            written += len(line)
    return path


def build_c(work, src):
    """Compiles a C program of the repository into `work` (again when the source is newer)."""
    src = os.path.join(ROOT, src)
    exe = os.path.join(work, os.path.splitext(os.path.basename(src))[0])
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    return exe


PY_DICT = """
import hashlib, sys
n = int(sys.argv[1])
d = {}
for i in range(n):
    d["key-%d" % i] = i * 7 + 1
s = 0
for i in range(0, n, 3):
    s += d["key-%d" % i]
print(len(d), s)
"""


def programs(scale, work):
    """The fixed set: name -> (argv, stdin path or None)."""
    text = text_file(os.path.join(work, f"text-{scale}.txt"), max(1, int(40 * scale)))
    small = text_file(os.path.join(work, f"small-{scale}.txt"), max(1, int(5 * scale)))
    py = os.path.join(work, "dict.py")
    with open(py, "w") as f:
        f.write(PY_DICT)
    rmw = build_c(work, "benches/scripts/random_touch.c")
    smallalloc = build_c(work, "preload/tests/c/smallalloc.c")
    return {
        "sort": (["sort", "-S", "300M", text], None),
        "xz": (["xz", "-9", "-T1", "-c", small], None),
        "python": (["python3", py, str(int(2_000_000 * scale))], None),
        "rmw": ([rmw, str(int(2_000_000 * scale)), str(max(16, int(128 * scale)))], None),
        "smallalloc": ([smallalloc, str(int(1_000_000 * scale))], None),
    }


def commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


class Zram:
    """Swap to zram under a cgroup v1 memory limit (as benches/scripts/zram-run.sh)."""

    def __init__(self, swap_mib):
        self.ok = os.path.exists("/sys/block/zram0") and os.path.isdir("/sys/fs/cgroup/memory") and os.geteuid() == 0
        self.swap_mib = swap_mib
        self.on = False

    def __enter__(self):
        if not self.ok:
            return self
        subprocess.run(["swapoff", "/dev/zram0"], stderr=subprocess.DEVNULL)
        with open("/sys/block/zram0/reset", "w") as f:
            f.write("1")
        with open("/sys/block/zram0/disksize", "w") as f:
            f.write(f"{self.swap_mib}M")
        subprocess.run(["mkswap", "/dev/zram0"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["swapon", "/dev/zram0"], check=True)
        self.on = True
        return self

    def __exit__(self, *exc):
        if self.on:
            subprocess.run(["swapoff", "/dev/zram0"], stderr=subprocess.DEVNULL)
            with open("/sys/block/zram0/reset", "w") as f:
                f.write("1")

    def cgroup(self, limit):
        cg = f"/sys/fs/cgroup/memory/mosaic-programs-{os.getpid()}-{time.monotonic_ns()}"
        os.mkdir(cg)
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        try:
            with open(os.path.join(cg, "memory.swappiness"), "w") as f:
                f.write("100")
        except OSError:
            pass
        return cg


def oom_kills(cg):
    try:
        for line in open(os.path.join(cg, "memory.oom_control")):
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_one(argv, timeout, cgroup=None, env=None, wrapper=()):
    """Runs argv under GNU time, itself under `wrapper` (mosrun), so the peak RSS is the
    program's and not the wrapper's (mosrun's embedded server holds the pages it stores);
    returns (seconds, peak RSS KiB, sha256 of stdout, status, timed out)."""
    with tempfile.NamedTemporaryFile(prefix="mosaic-time-", delete=False) as tf:
        tfile = tf.name
    full = list(wrapper) + [TIME, "-f", "%M", "-o", tfile] + argv
    pre = None
    if cgroup:
        def pre():
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
    digest = hashlib.sha256()
    start = time.monotonic()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=pre, env=env,
                         start_new_session=True)
    timed_out = False
    # Read the output while it runs (xz and sort write a lot), bounded by the deadline.
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        chunk = p.stdout.read(1 << 20)
        if chunk:
            digest.update(chunk)
            continue
        if p.poll() is not None:
            rest = p.stdout.read()
            if rest:
                digest.update(rest)
            break
        if time.monotonic() - start > timeout:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            break
        time.sleep(0.005)
    seconds = time.monotonic() - start
    peak = 0
    try:
        lines = [l for l in open(tfile).read().split("\n") if l.strip().isdigit()]
        peak = int(lines[-1]) if lines else 0
    finally:
        os.unlink(tfile)
    return seconds, peak, digest.hexdigest()[:16], p.returncode, timed_out


class ShmServer:
    """A mosaic-memserver on shm:// for the run, with the job's key."""

    def __init__(self, key_env, capacity, pin=()):
        self.name = f"shm://mosaic-programs-{os.getpid()}"
        self.p = subprocess.Popen(
            list(pin) + [os.path.join(RELEASE, "mosaic-memserver"), "--listen", self.name, "--capacity", capacity, "--stdin-lifetime"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=key_env, text=True)
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"mosaic-memserver did not start: {line!r}")

    def stop(self):
        self.p.stdin.close()
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="input sizes: 1 = sort 40 MB, xz 5 MB, a dict of 2M, rmw 128 MiB, 1M small entries")
    ap.add_argument("--fractions", default="0.25,0.5", help="limits as fractions of the plain run's peak RSS")
    ap.add_argument("--modes", default="plain,tcp,shm,zram")
    ap.add_argument("--programs", default="sort,xz,python,rmw,smallalloc,netram-demo")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--split-cpus", action="store_true",
                    help="run the program on the last CPU and the memory servers on the others (servers as if on other hosts)")
    ap.add_argument("--out", help="also append the JSON lines to this file")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mosaic-programs"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    out = open(a.out, "a") if a.out else None
    stamp = {"date": datetime.date.today().isoformat(), "commit": commit(), "scale": a.scale}
    job_pin, server_pin = (), ()
    if a.split_cpus:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            sys.exit("--split-cpus needs at least two CPUs")
        job_pin = ("taskset", "-c", str(cpus[-1]))
        server_pin = ("taskset", "-c", ",".join(map(str, cpus[:-1])))
        stamp["split_cpus"] = {"job": cpus[-1:], "servers": cpus[:-1]}

    def emit(rec):
        rec = {**rec, **stamp}
        line = json.dumps(rec)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    modes = a.modes.split(",")
    fractions = [float(f) for f in a.fractions.split(",")]
    wanted = a.programs.split(",")
    progs = programs(a.scale, a.work)
    key = subprocess.run([os.path.join(RELEASE, "mosrun"), "--version"], capture_output=True)  # fails early if unbuilt
    if key.returncode != 0:
        sys.exit("build first: cargo build --release -p mosrun -p mosaic-preload -p mosaic-netram -p mosaic-examples")
    key_env = {**os.environ, "MOSAIC_CLUSTER_KEY": "programs-harness-" + os.urandom(8).hex()}
    zram = Zram(swap_mib=4096)
    with zram:
        for rnd in range(a.rounds):
            for name, (argv, _) in progs.items():
                if name not in wanted:
                    continue
                log(f"round {rnd + 1}: {name} plain")
                secs, peak, sha, status, to = run_one(argv, a.timeout, wrapper=job_pin)
                emit({"program": name, "mode": "plain", "limit_bytes": None, "seconds": round(secs, 3),
                      "peak_rss_kib": peak, "checksum": sha, "exit": status, "timed_out": to, "oom_kills": 0})
                if status != 0:
                    log(f"{name} failed plain (status {status}); skipping its limited runs")
                    continue
                for frac in fractions:
                    limit = int(peak * 1024 * frac) // 4096 * 4096
                    for mode in modes:
                        if mode == "plain":
                            continue
                        rec = {"program": name, "mode": mode, "fraction": frac, "limit_bytes": limit, "plain_checksum": sha}
                        log(f"round {rnd + 1}: {name} {mode} at {frac:.0%} ({limit >> 20} MiB)")
                        if mode in ("tcp", "shm", "tcp-large-only"):
                            cmd = list(server_pin) + [os.path.join(RELEASE, "mosrun"), "--local-budget", str(limit)]
                            if mode == "tcp-large-only":
                                cmd.append("--large-only")
                            server = None
                            if mode == "shm":
                                server = ShmServer(key_env, "8G", server_pin)
                                cmd += ["--servers", server.name]
                            try:
                                secs, p2, sha2, st2, to2 = run_one(argv, a.timeout, env=key_env, wrapper=cmd + ["--", *job_pin])
                            finally:
                                if server:
                                    server.stop()
                            emit({**rec, "seconds": round(secs, 3), "peak_rss_kib": p2, "checksum": sha2, "exit": st2,
                                  "timed_out": to2, "oom_kills": 0, "same_output": sha2 == sha})
                        elif mode == "zram":
                            if not zram.ok:
                                emit({**rec, "skipped": "no zram, cgroup v1 memory controller or root here"})
                                continue
                            cg = zram.cgroup(limit)
                            try:
                                secs, p2, sha2, st2, to2 = run_one(argv, a.timeout, cgroup=cg, wrapper=job_pin)
                                kills = oom_kills(cg)
                            finally:
                                try:
                                    os.rmdir(cg)
                                except OSError:
                                    pass
                            emit({**rec, "seconds": round(secs, 3), "peak_rss_kib": p2, "checksum": sha2, "exit": st2,
                                  "timed_out": to2, "oom_kills": kills, "same_output": sha2 == sha})
            if "netram-demo" in wanted:
                for transport in [m for m in modes if m in ("tcp", "shm")]:
                    log(f"round {rnd + 1}: netram-demo over {transport}")
                    start = time.monotonic()
                    r = subprocess.run([os.path.join(RELEASE, "netram-demo"), "--transport", transport],
                                       capture_output=True, text=True, timeout=a.timeout, env=key_env)
                    rec = {"program": "netram-demo", "mode": transport, "exit": r.returncode,
                           "seconds": round(time.monotonic() - start, 3)}
                    for line in r.stdout.splitlines():
                        if line.startswith("sorted in "):
                            rec["sort_seconds"] = float(line.split()[2])
                        if line.startswith("the same job on local memory:"):
                            parts = line.replace(";", "").replace(",", "").split()
                            rec["local_seconds"] = float(parts[6])
                            rec["netram_seconds"] = float(parts[11])
                    emit(rec)
    if out:
        out.close()


if __name__ == "__main__":
    main()
