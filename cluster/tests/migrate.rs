#![allow(missing_docs)]
//! Jobs started by `mosrun --migratable` move between two node agents (`mosaicd`) on loopback
//! while they run, there and back, and print exactly what an unmigrated run prints. Needs root
//! (the restorer uses pid namespaces); skipped otherwise.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{c_program, root, tmp, Job, Node};

#[test]
fn a_c_loop_moves_there_and_back_and_prints_what_it_would_have() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let args = ["60", "16", "20"];
    let expected = Command::new(&prog).args(args).output().unwrap().stdout;
    let (a, b) = (Node::start(), Node::start());
    let mut cmd = vec![prog.to_str().unwrap()];
    cmd.extend(args);
    let job = Job::start(&a, &tmp("counter"), &cmd);
    job.wait_for("step 10 ");
    let said = job.migrate(&b);
    assert!(said.contains("moved to"), "{said}");
    job.wait_for("step 30 ");
    job.migrate(&a);
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
}

/// Runs `cmd` unmigrated, then under `mosrun --migratable`, moving it to the other node once
/// `first` is printed and back once `second` is: both outputs must be equal.
fn there_and_back(name: &str, cmd: &[&str], first: &str, second: &str) {
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(expected.status.success(), "{name} failed unmigrated");
    let (a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp(name), cmd);
    job.wait_for(first);
    job.migrate(&b);
    job.wait_for(second);
    job.migrate(&a);
    let (st, out) = job.finish();
    assert!(st.success(), "{name}: {st:?}");
    assert!(
        out == expected.stdout,
        "{name}: the output differs from an unmigrated run's:\n{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_threaded_program_with_a_mutex_and_condition_variables_moves_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("workers", "tests/c/workers.c");
    there_and_back("workers", &[prog.to_str().unwrap(), "150", "20"], "item 20 ", "item 70 ");
}

#[test]
fn python_moves_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let script = "import time\n\
                  primes = []\n\
                  for n in range(2, 40001):\n\
                  \x20   if all(n % p for p in primes if p * p <= n):\n\
                  \x20       primes.append(n)\n\
                  \x20   if n % 500 == 0:\n\
                  \x20       print(n, len(primes), sum(primes) % 1000003, flush=True)\n\
                  \x20       time.sleep(0.02)\n";
    there_and_back("python", &["/usr/bin/python3", "-c", script], "\n5000 ", "\n20000 ");
}

#[test]
fn xz_compressing_a_file_to_stdout_moves_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // 8 MiB of text xz takes a few seconds over.
    let input = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xz-input.txt");
    let mut text = String::with_capacity(9 << 20);
    let mut x: u64 = 88172645463325252;
    while text.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!(
            "line {} value {} {}\n",
            x % 100_000,
            x >> 40,
            ["alpha", "beta", "gamma", "delta"][(x % 4) as usize]
        ));
    }
    std::fs::write(&input, text).unwrap();
    let cmd = ["/usr/bin/xz", "-T1", "-6", "-c", input.to_str().unwrap()];
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(expected.status.success());
    let (a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp("xz"), &cmd);
    job.wait_for_bytes(expected.stdout.len() / 5);
    job.migrate(&b);
    job.wait_for_bytes(expected.stdout.len() / 2);
    job.migrate(&a);
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert!(
        out == expected.stdout,
        "xz's output differs from an unmigrated run's ({} bytes against {})",
        out.len(),
        expected.stdout.len()
    );
}

#[test]
fn a_process_that_cannot_move_is_told_why_and_runs_on() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("socket_holder", "tests/c/socket_holder.c");
    let cmd = [prog.to_str().unwrap(), "60"];
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().stdout;
    let (a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp("socket"), &cmd);
    job.wait_for("step 5 ");
    let (ok, said) = job.try_migrate(&b);
    assert!(!ok && said.contains("descriptor 3 is a socket"), "{said}");
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(out, expected);
}

#[test]
fn a_destination_that_dies_during_the_move_leaves_the_process_running_at_its_source() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The destination's restorer kills its agent: the agent dies in the middle of the move.
    let killer = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kill-my-agent.sh");
    std::fs::write(&killer, "#!/bin/sh\nkill -9 $PPID\n").unwrap();
    Command::new("chmod").arg("755").arg(&killer).status().unwrap();
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let cmd = [prog.to_str().unwrap(), "50", "16", "20"];
    let expected = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().stdout;
    let a = Node::start();
    let mut b = Node::start_with(&["--restorer", killer.to_str().unwrap()]);
    let job = Job::start(&a, &tmp("deaddest"), &cmd);
    job.wait_for("step 5 ");
    let (ok, said) = job.try_migrate(&b);
    assert!(!ok && said.contains("runs on here"), "{said}");
    assert!(b.child.wait().unwrap().signal() == Some(9), "the destination's agent was to die");
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected));
}

#[test]
fn a_source_that_dies_after_the_hand_over_fails_loudly_never_with_zeros() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    // 1 GiB touched: its pages are still on their way when the source goes.
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let cmd = [prog.to_str().unwrap(), "40", "1024", "20"];
    let expected = String::from_utf8(Command::new(cmd[0]).args(&cmd[1..]).output().unwrap().stdout).unwrap();
    let (mut a, b) = (Node::start(), Node::start());
    let job = Job::start(&a, &tmp("deadsource"), &cmd);
    job.wait_for("step 2 ");
    job.migrate(&b);
    let _ = a.child.kill();
    let _ = a.child.wait();
    let (st, out) = job.finish();
    let out = String::from_utf8(out).unwrap();
    // The job dies of SIGBUS (a page that can no longer come), and everything it printed is what
    // an unmigrated run prints: no page read as zeros.
    assert_eq!(st.code(), Some(128 + libc::SIGBUS), "{st:?}\n{out}");
    assert!(expected.starts_with(&out), "printed what an unmigrated run does not:\n{out}");
}

#[test]
fn standard_input_follows_the_job_there_and_back() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    use std::io::Write;
    let prog = c_program("echo", "tests/c/echo.c");
    let (a, b) = (Node::start(), Node::start());
    let mut job = Job::start_with_input(&a, &tmp("echo"), &[prog.to_str().unwrap()], Stdio::piped());
    let mut input = job.child.stdin.take().unwrap();
    input.write_all(b"one\ntwo\n").unwrap();
    job.wait_for("got 2: two");
    job.migrate(&b);
    input.write_all(b"three\n").unwrap();
    job.wait_for("got 3: three");
    job.migrate(&a);
    input.write_all(b"four\n").unwrap();
    job.wait_for("got 4: four");
    drop(input);
    let (st, out) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&out), "got 1: one\ngot 2: two\ngot 3: three\ngot 4: four\nend after 4 lines\n");
}

/// `mosctl drain` moves every migratable job of a node to another, and they end as they would
/// have.
#[test]
fn draining_a_node_moves_its_jobs_away() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let prog = c_program("counter", "../migrate/tests/c/counter.c");
    let args = ["40", "16", "20"];
    let expected = Command::new(&prog).args(args).output().unwrap().stdout;
    // The agent finds the job through its job file: the run directory is the agent's too.
    let dir = tmp("drain");
    std::fs::create_dir_all(&dir).unwrap();
    let a = Node::launch(None, &[], Some(&dir));
    let b = Node::start_with(&["--join", &a.uri]);
    let key = common::key();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !Command::new(env!("CARGO_BIN_EXE_mosctl"))
        .args(["nodes", "--json", "--node", &a.uri])
        .env("MOSAIC_CLUSTER_KEY", &key)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("\"node\":\"{}\"", b.uri)))
    {
        assert!(std::time::Instant::now() < deadline, "a never heard b's load");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut cmd = vec![prog.to_str().unwrap()];
    cmd.extend(args);
    let job = Job::start(&a, &dir, &cmd);
    job.wait_for("step 5 ");
    let out = Command::new(env!("CARGO_BIN_EXE_mosctl"))
        .args(["drain", &a.uri])
        .env("MOSAIC_CLUSTER_KEY", &key)
        .env("MOSAIC_RUN_DIR", &dir)
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let (st, output) = job.finish();
    assert!(st.success(), "{st:?}");
    assert_eq!(String::from_utf8_lossy(&output), String::from_utf8_lossy(&expected));
    assert!(out.status.success() && said.contains("1 process(es) moved"), "{said}");
}
