#![allow(missing_docs)]
//! mosrun end to end: unmodified programs (a C program built without Mosaic, python3, sort) run
//! with a local budget smaller than their working set give the same output as without Mosaic,
//! within the budget plus a stated overhead; bad setups fail with clear errors.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Peak RSS over the local budget that the tests accept (issue 10's bound): the program itself
/// (python3's interpreter alone is about 13 MiB here), Mosaic's code, threads, page tables and
/// the allocator slack of its cache of recent victims.
/// Checked strictly with optimisations (CI runs these tests with `--release` too); an
/// unoptimised libmosaic_preload.so maps 1.7 MB more code (2.9 MB of text against 1.2 MB), which
/// debug builds are allowed on top.
const OVERHEAD_KIB: u64 = 16 * 1024 + if cfg!(debug_assertions) { 2048 } else { 0 };

/// mosrun, with libmosaic_preload.so built beside it (a `cargo test -p mosrun` alone does not
/// build another package's library).
fn mosrun() -> Command {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mosrun"));
    BUILD.call_once(|| {
        let profile = exe.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()).unwrap_or("debug").to_string();
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "mosaic-preload"]);
        if profile == "release" {
            cargo.arg("--release");
        }
        let st = cargo.status().unwrap();
        assert!(st.success(), "building mosaic-preload failed");
    });
    Command::new(exe)
}

/// Builds `preload/tests/c/NAME.c` (an ordinary C program, nothing of Mosaic in it).
fn c_program(name: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../preload/tests/c/{name}.c"));
    let st =
        Command::new("cc").args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"]).arg(&out).arg(&src).status().unwrap();
    assert!(st.success(), "cc failed");
    out
}

fn bigalloc() -> PathBuf {
    c_program("bigalloc")
}

/// The probe: `munmap` of the head of a large allocation freed the whole block (so an
/// allocator's over-allocate-and-trim would have its kept middle handed out again), an unmap
/// starting inside a block was ignored, and `MADV_DONTNEED` brought back old contents.
#[test]
fn partial_unmaps_remaps_and_dontneed_behave_as_the_kernels() {
    let prog = c_program("mappings");
    let expected = ok(&Command::new(&prog).output().unwrap());
    assert!(expected.contains("done") && !expected.contains(": 0"), "{expected}");
    let under = mosrun().args(["--local-budget", "16M", "--threshold", "1M", "--"]).arg(&prog).output().unwrap();
    assert_eq!(ok(&under), expected);
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "status {:?}\nstdout {}\nstderr {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn maxrss_kib(stderr: &[u8]) -> u64 {
    let s = String::from_utf8_lossy(stderr);
    s.lines()
        .find_map(|l| l.strip_prefix("maxrss_kib "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss line in {s}"))
}

/// Runs `program` plain, whose peak RSS must pass `plain_over_mib` MiB (so the run under a
/// smaller budget proves something), then as `mosrun OPTIONS -- program`; asserts the same
/// output and returns the peak RSS under mosrun, in KiB (the program reports it on stderr).
fn peak_under_mosrun(program: &[OsString], plain_over_mib: u64, options: &[&str]) -> u64 {
    let plain = Command::new(&program[0]).args(&program[1..]).output().unwrap();
    let expected = ok(&plain);
    assert!(maxrss_kib(&plain.stderr) > plain_over_mib * 1024, "the program really uses its memory");
    let under = mosrun().args(options).arg("--").args(program).output().unwrap();
    assert_eq!(ok(&under), expected);
    maxrss_kib(&under.stderr)
}

#[test]
fn an_unmodified_c_program_gives_the_same_output_within_the_budget() {
    let rss = peak_under_mosrun(&[bigalloc().into(), "128".into()], 128, &["--local-budget", "32M"]);
    eprintln!("bigalloc 128 MiB under a 32 MiB budget: peak RSS {rss} KiB");
    assert!(rss <= 32 * 1024 + OVERHEAD_KIB, "peak RSS {rss} KiB over a 32 MiB budget");
}

/// The probe: a program made of small allocations (a hash table of 300,000 malloc'd nodes and
/// strings, about 55 MB) ran far over its budget when only allocations of a MiB or more went to
/// network RAM. With small allocations on the region its peak RSS keeps to the budget; with
/// `--large-only` (the old placement) the same program passes it, which shows the bound is
/// the placement's doing.
#[test]
fn a_program_of_small_allocations_keeps_to_the_budget() {
    let prog = [c_program("smallalloc").into(), "300000".into()];
    let rss = peak_under_mosrun(&prog, 48, &["--local-budget", "16M"]);
    eprintln!("smallalloc, 300,000 entries under a 16 MiB budget: peak RSS {rss} KiB");
    assert!(rss <= 16 * 1024 + OVERHEAD_KIB, "peak RSS {rss} KiB over a 16 MiB budget");
    let rss = peak_under_mosrun(&prog, 48, &["--local-budget", "16M", "--large-only"]);
    eprintln!("the same with --large-only: peak RSS {rss} KiB");
    assert!(rss > 16 * 1024 + OVERHEAD_KIB, "small allocations stayed within the budget without the region");
}

/// The probe: Python's objects live in arenas it maps itself with `mmap64` (CPython is built
/// with `_FILE_OFFSET_BITS=64`), which the shim did not interpose, so a program of many small
/// objects kept them all outside the region (a dict of a million entries peaked at 131 MB under
/// a 34 MiB budget). 600,000 strings in a list, about 60 MB plain, under 16 MiB.
#[test]
fn python_objects_keep_to_the_budget() {
    if !Command::new("python3").arg("-c").arg("1").status().is_ok_and(|s| s.success()) {
        eprintln!("skipped: python3 not installed");
        return;
    }
    let py = "import resource, sys\nl = [str(i) * 3 for i in range(600_000)]\n\
              print(len(l), sum(len(x) for x in l), l[12345])\n\
              print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)";
    let rss = peak_under_mosrun(&["python3".into(), "-c".into(), py.into()], 48, &["--local-budget", "16M"]);
    eprintln!("python3, 600,000 strings under a 16 MiB budget: peak RSS {rss} KiB");
    assert!(rss <= 16 * 1024 + OVERHEAD_KIB, "python's peak RSS {rss} KiB over a 16 MiB budget");
}

#[test]
fn python_and_sort_give_the_same_output() {
    // 96 MiB in one bytearray, six times the budget; the peak RSS goes to stderr.
    let py = "import resource, sys\nb = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = i % 251\n\
              print(sum(b[::4096]), len(b))\n\
              print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)";
    if Command::new("python3").arg("-c").arg("1").status().is_ok_and(|s| s.success()) {
        let rss = peak_under_mosrun(&["python3".into(), "-c".into(), py.into()], 96, &["--local-budget", "16M"]);
        eprintln!("python3, 96 MiB under a 16 MiB budget: peak RSS {rss} KiB");
        assert!(rss <= 16 * 1024 + OVERHEAD_KIB, "python's peak RSS {rss} KiB over a 16 MiB budget");
    } else {
        eprintln!("skipped python3: not installed");
    }
    // sort reads its input into large buffers with read(2): faults inside system calls.
    let input = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sort-input");
    let mut text = String::new();
    let mut x = 88_172_645_463_325_252u64;
    for _ in 0..400_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{x:020} line\n"));
    }
    std::fs::write(&input, text).unwrap();
    let plain = ok(&Command::new("sort").args(["-S", "64M"]).arg(&input).output().unwrap());
    let under = ok(&mosrun().args(["--local-budget", "8M", "--", "sort", "-S", "64M"]).arg(&input).output().unwrap());
    assert!(under == plain, "sort output differs under mosrun");
    // The probe: `sort -S 300M` passed its budget (164 MB at 64 MiB). GNU time measures it.
    if std::path::Path::new("/usr/bin/time").exists() {
        let o = mosrun()
            .args(["--local-budget", "8M", "--", "/usr/bin/time", "-f", "maxrss_kib %M", "sort", "-S", "300M"])
            .arg(&input)
            .output()
            .unwrap();
        assert!(ok(&o) == plain, "sort -S 300M output differs under mosrun");
        let rss = maxrss_kib(&o.stderr);
        eprintln!("sort -S 300M under an 8 MiB budget: peak RSS {rss} KiB");
        assert!(rss <= 8 * 1024 + OVERHEAD_KIB, "sort's peak RSS {rss} KiB over an 8 MiB budget");
    } else {
        eprintln!("skipped sort's peak RSS: /usr/bin/time is not installed");
    }
}

#[test]
fn exit_status_and_signals_come_through() {
    assert_eq!(mosrun().args(["--", "sh", "-c", "exit 7"]).status().unwrap().code(), Some(7));
    assert_eq!(mosrun().args(["--", "sh", "-c", "kill -TERM $$"]).status().unwrap().code(), Some(128 + 15));
}

#[test]
fn bad_setups_fail_with_clear_errors() {
    let o = mosrun()
        .args(["--servers", "tcp://127.0.0.1:1", "--", "true"])
        .env("MOSAIC_CLUSTER_KEY", "mosrun-test-cluster-key")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("tcp://127.0.0.1:1 cannot be reached"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = mosrun().args(["--local-budget", "4K", "--", "true"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("impossible"));
    let o = mosrun().args(["--local-budget", "lots", "--", "true"]).output().unwrap();
    assert!(!o.status.success());
    let o = mosrun().args(["--", "/nonexistent/program"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot run /nonexistent/program"));
}

#[test]
fn a_program_that_forks_and_execs_keeps_working() {
    if !Command::new("python3").arg("-c").arg("1").status().is_ok_and(|s| s.success()) {
        eprintln!("skipped: python3 not installed");
        return;
    }
    let py = "import subprocess\nb = bytearray(32 << 20)\nb[5 << 20] = 7\n\
              out = subprocess.run(['echo', 'child ok'], capture_output=True, text=True).stdout.strip()\n\
              print(out, b[5 << 20], len(b))";
    let under = ok(&mosrun().args(["--local-budget", "8M", "--", "python3", "-c", py]).output().unwrap());
    assert_eq!(under.trim(), format!("child ok 7 {}", 32 << 20));
}

/// The probe: a forked child could not touch the heap it inherited (Python's fork-based
/// multiprocessing crashed). Now a C program that forks twice (and once more from a child)
/// and writes on both sides, and a `multiprocessing` pool with the fork start method, print
/// the same under mosrun as without it.
#[test]
fn forked_children_see_the_parent_as_of_the_fork_and_write_apart() {
    let prog = c_program("forks");
    let plain = Command::new(&prog).arg("48").output().unwrap();
    let expected = ok(&plain);
    assert!(expected.contains("grandchild: inherited intact") && expected.contains("children ok"), "{expected}");
    let under = mosrun().args(["--local-budget", "16M", "--"]).arg(&prog).arg("48").output().unwrap();
    assert_eq!(ok(&under), expected);
    let rss = maxrss_kib(&under.stderr);
    eprintln!("forks, 48 MiB under a 16 MiB budget: the parent's peak RSS {rss} KiB");
    assert!(rss <= 16 * 1024 + OVERHEAD_KIB, "the forking parent's peak RSS {rss} KiB over a 16 MiB budget");
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../preload/tests/multiprocessing_fork.py");
    if !Command::new("python3").arg("-c").arg("1").status().is_ok_and(|s| s.success()) {
        eprintln!("skipped python3: not installed");
        return;
    }
    let expected = ok(&Command::new("python3").arg(&py).output().unwrap());
    let under = mosrun().args(["--local-budget", "16M", "--", "python3"]).arg(&py).output().unwrap();
    assert_eq!(ok(&under), expected);
    // This interpreter (multiprocessing and its threads loaded) takes about 16 MiB by itself, so
    // the bound here is its own footprint with almost no data, plus the budget, plus 4 MiB.
    let small = ok_stderr(&Command::new("python3").arg(&py).env("FORK_TEST_MIB", "1").output().unwrap());
    let (own, rss) = (maxrss_kib(&small), maxrss_kib(&under.stderr));
    eprintln!("multiprocessing, 48 MiB under a 16 MiB budget: peak RSS {rss} KiB (the interpreter alone: {own} KiB)");
    assert!(rss <= own + (16 + 4) * 1024, "peak RSS {rss} KiB: more than {own} KiB + the budget + 4 MiB");
}

fn ok_stderr(o: &Output) -> Vec<u8> {
    ok(o);
    o.stderr.clone()
}

/// dsm-litmus (mosaic-dsm's litmus program), built beside mosrun.
fn dsm_litmus() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mosrun"));
    let dir = exe.parent().expect("target directory").to_path_buf();
    BUILD.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "-p", "mosaic-dsm", "--bin", "dsm-litmus"]);
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cargo.arg("--release");
        }
        assert!(cargo.status().unwrap().success(), "building dsm-litmus failed");
    });
    dir.join("dsm-litmus")
}

#[test]
fn mosrun_n_starts_the_nodes_of_a_dsm_job() {
    let out = mosrun().args(["-n", "3"]).arg(dsm_litmus()).args(["counter", "200"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for rank in 0..3 {
        assert!(text.contains(&format!("rank {rank}: counter ok: both counters 600")), "{text}");
    }
}

/// `mosrun -n --local-budget` without servers: mosrun runs a memory server for the job and each
/// node keeps at most the budget of the region mapped, the pages it owns beyond it going there.
#[test]
fn mosrun_n_with_a_budget_puts_the_nodes_pages_on_network_ram() {
    let out = mosrun()
        .args(["-n", "2", "--local-budget", "256K", "--verbose"])
        .arg(dsm_litmus())
        .arg("fill")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(err.contains("started a memory server at tcp://127.0.0.1:"), "{err}");
    for rank in 0..2 {
        let line =
            text.lines().find(|l| l.starts_with(&format!("rank {rank}: fill ok"))).unwrap_or_else(|| panic!("{text}"));
        assert!(!line.contains("pages_stored: 0,"), "{line}");
    }
    let out =
        mosrun().args(["-n", "2", "--servers", "tcp://127.0.0.1:1"]).arg(dsm_litmus()).arg("fill").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --local-budget"));
}

#[test]
fn mosrun_n_stops_the_job_when_a_node_fails() {
    let start = std::time::Instant::now();
    // Every node fails at once (an unknown test): mosrun reports one and exits with its status.
    let out = mosrun().args(["-n", "2"]).arg(dsm_litmus()).arg("no-such-test").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(start.elapsed() < std::time::Duration::from_secs(20));
    let out = mosrun().args(["-n", "0", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a job has 1 to 64 nodes"));
}

/// `--hosts` on loopback: three nodes on two "hosts" (127.0.0.2 and 127.0.0.3, node 2 back on
/// the first), started through a launcher that runs the command here (`env`), meeting at
/// mosrun's rendezvous server.
#[test]
fn mosrun_hosts_runs_the_nodes_by_turns_through_the_launcher() {
    let out = mosrun()
        .args(["-n", "3", "--hosts", "a=127.0.0.2,b=127.0.0.3", "--launcher", "env", "--verbose"])
        .arg(dsm_litmus())
        .args(["counter", "100"])
        .env_remove("MOSAIC_CLUSTER_KEY")
        .env_remove("MOSAIC_CLUSTER_KEY_FILE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(
        err.contains("3 nodes of") && err.contains("on a,b") && err.contains("meeting at tcp://127.0.0.1:"),
        "{err}"
    );
    for rank in 0..3 {
        assert!(text.contains(&format!("rank {rank}: counter ok: both counters 300")), "{text}");
    }
    // Bad hosts, and options that need -n or --hosts, are refused before anything starts.
    for (args, want) in [
        (&["-n", "2", "--hosts", "a=not-an-ip", "true"][..], "not an IP address"),
        (&["--hosts", "a=127.0.0.2", "true"], "--nodes"),
        (&["-n", "2", "--launcher", "env", "true"], "--hosts"),
    ] {
        let out = mosrun().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Network namespaces joined by a bridge, each standing for a host; removed when dropped.
struct Hosts {
    names: Vec<String>,
}

impl Hosts {
    /// A hub namespace with a bridge at 10.231.0.1/24 and `n` host namespaces at 10.231.0.2...
    fn new(n: usize) -> Hosts {
        let tag = std::process::id() % 100_000;
        let hub = format!("mh{tag}");
        let mut names = vec![hub.clone()];
        names.extend((0..n).map(|i| format!("mh{tag}h{i}")));
        let hosts = Hosts { names };
        let ip = |args: &str| {
            let out = Command::new("ip").args(args.split_whitespace()).output().expect("run ip");
            assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
        };
        for name in &hosts.names {
            ip(&format!("netns add {name}"));
            ip(&format!("-n {name} link set lo up"));
        }
        ip(&format!("-n {hub} link add br0 type bridge"));
        ip(&format!("-n {hub} addr add 10.231.0.1/24 dev br0"));
        ip(&format!("-n {hub} link set br0 up"));
        for (i, host) in hosts.names[1..].iter().enumerate() {
            ip(&format!("-n {host} link add eth0 type veth peer name p{i} netns {hub}"));
            ip(&format!("-n {hub} link set p{i} master br0 up"));
            ip(&format!("-n {host} addr add 10.231.0.{}/24 dev eth0", i + 2));
            ip(&format!("-n {host} link set eth0 up"));
        }
        hosts
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// `mosrun --hosts` across network namespaces, each a host with its own address: mosrun in the
/// hub, the nodes started in theirs by `ip netns exec`. Needs root (CI runs as root).
#[test]
fn mosrun_hosts_runs_a_job_across_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI must run this test: it needs root and iproute2");
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let hosts = Hosts::new(2);
    let hub = hosts.names[0].clone();
    let out = Command::new("ip")
        .args(["netns", "exec", &hub])
        .arg(env!("CARGO_BIN_EXE_mosrun"))
        .args(["-n", "3", "--verbose", "--launcher", "ip netns exec {host}", "--hosts"])
        .arg(format!("{}=10.231.0.2,{}=10.231.0.3", hosts.names[1], hosts.names[2]))
        .arg(dsm_litmus())
        .args(["mp", "100"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}{err}");
    assert!(err.contains("meeting at tcp://10.231.0.1:"), "{err}");
    for rank in 0..3 {
        assert!(text.contains(&format!("rank {rank}: mp ok")), "{text}");
    }
}
