//! SIGKILL at 100 random moments while a process writes and flushes the
//! node's database (RELIABILITY.md, "State on disk"): it always reopens,
//! and nothing that was flushed and acknowledged is lost.
//!
//! A file of its own: the writer is this test binary run again, and a
//! child forked while another test of the same process held a database
//! would hold that database's lock until it execs.

use std::io::Write;

use loip::store::{Store, Tree};
use tempfile::TempDir;

/// The writer of [`a_hundred_kills_lose_nothing_flushed`], run as its child
/// process: from the number after the last one stored, it stores each
/// number under its own key and as `last`, flushes, then prints
/// `acked N`, until it is killed.
#[test]
#[ignore = "the child process of a_hundred_kills_lose_nothing_flushed"]
fn kill_loop_writer() {
    let dir = std::env::var_os("LOIP_KILL_LOOP_DIR").expect("LOIP_KILL_LOOP_DIR");
    let s = Store::open(&dir).unwrap();
    let mut n = s
        .get_json::<u64>(Tree::Adapt, b"last")
        .unwrap()
        .map_or(0, |n| n + 1);
    let mut out = std::io::stdout().lock();
    loop {
        s.put_json(Tree::Adapt, format!("n{n}").as_bytes(), &n)
            .unwrap();
        s.put_json(Tree::Adapt, b"last", &n).unwrap();
        s.flush().unwrap();
        writeln!(out, "acked {n}").unwrap();
        out.flush().unwrap();
        n += 1;
    }
}

/// SIGKILL at 100 random moments while a process writes and flushes (also
/// while it opens the database): every reopen succeeds without setting the
/// database aside, and every number acknowledged, that is flushed, is there.
#[test]
fn a_hundred_kills_lose_nothing_flushed() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("data");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut acked: Option<u64> = None;
    for round in 0..100 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "kill_loop_writer", "--ignored", "--nocapture"])
            .args(["--test-threads", "1", "-q"])
            .env("LOIP_KILL_LOOP_DIR", &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("acked ")?.parse::<u64>().ok())
                .last()
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // 0 to 60 ms: some kills land while the database opens.
        std::thread::sleep(Duration::from_micros(rng % 60_000));
        child.kill().unwrap();
        child.wait().unwrap();
        if let Some(n) = reader.join().unwrap() {
            acked = Some(n);
        }

        let s = Store::open(&dir).unwrap_or_else(|e| panic!("round {round}: {e}"));
        if let Some(r) = s.recovery() {
            panic!("round {round}: set aside after a kill: {}", r.reason);
        }
        if let Some(n) = acked {
            let last = s.get_json::<u64>(Tree::Adapt, b"last").unwrap();
            assert!(last >= Some(n), "round {round}: last {last:?} < acked {n}");
            for k in [0, n / 2, n] {
                let v = s.get_json::<u64>(Tree::Adapt, format!("n{k}").as_bytes());
                assert_eq!(v.unwrap(), Some(k), "round {round}: n{k} lost");
            }
        }
    }
    assert!(
        acked.is_some_and(|n| n > 100),
        "the writer hardly ran: {acked:?}"
    );
}
