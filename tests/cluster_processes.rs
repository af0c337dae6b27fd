//! Real `loip run` processes on 127.0.0.1: three nodes form a cluster and
//! agree on a plan; the leader is killed and a new one takes over; the
//! killed node restarts from its data directory and rejoins.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::{identities, statuses, NodeFiles, Proc};
use loip::cluster::shell::{read_status, NodeStatus};
use loip::net::NodeId;

/// Starts a node; returns it and the address it listens on.
fn start(dir: &Path, n: u64, peer: Option<&str>) -> (Proc, String) {
    start_as(dir, &format!("d{n}"), &format!("n{n}"), peer)
}

fn start_as(dir: &Path, data: &str, identity: &str, peer: Option<&str>) -> (Proc, String) {
    let files = NodeFiles {
        data: dir.join(data),
        identity: dir.join(identity),
        stderr: dir.join(format!("stderr-{data}")),
    };
    let mut cmd = files.command(3, peer);
    files.spawn(&mut cmd)
}

/// All agree on one leader and a plan of exactly `members`.
fn agreed(st: &[NodeStatus], members: usize) -> Option<(NodeId, u64, u64)> {
    let first = &st[0].membership;
    let leader = first.leader?;
    let ok = st.iter().all(|s| {
        let m = &s.membership;
        m.leader == Some(leader) && m.committed == first.committed && m.pending.is_none()
    });
    (ok && first.committed.members.len() == members).then_some((
        leader,
        first.term,
        first.committed.epoch,
    ))
}

fn wait_agreed(
    procs: &[&Proc],
    members: usize,
    limit: Duration,
) -> Option<(NodeId, u64, u64, Duration)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = statuses(procs) {
            if let Some((l, t, e)) = agreed(&st, members) {
                return Some((l, t, e, start.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn three_processes_form_a_cluster_survive_the_leader_and_take_it_back() {
    let dir = tempfile::tempdir().unwrap();
    identities(dir.path(), 3, NodeId);
    let (p1, seed) = start(dir.path(), 1, None);
    let (p2, _) = start(dir.path(), 2, Some(&seed));
    let (p3, _) = start(dir.path(), 3, Some(&seed));
    let mut procs = [Some(p1), Some(p2), Some(p3)];
    let all: Vec<&Proc> = procs.iter().flatten().collect();
    let (leader, term, epoch, took) =
        wait_agreed(&all, 3, Duration::from_secs(30)).expect("three nodes agree on a plan");
    eprintln!("formed in {took:?}: leader {leader}, term {term}, epoch {epoch}");

    // Kill the leader.
    let li = (leader.0 - 1) as usize;
    let killed = procs[li].take().unwrap();
    let (killed_data, killed_identity) = (killed.data.clone(), killed.identity.clone());
    drop(killed); // SIGKILL
    let rest: Vec<&Proc> = procs.iter().flatten().collect();
    let (new_leader, new_term, new_epoch, took) =
        wait_agreed(&rest, 2, Duration::from_secs(15)).expect("the survivors agree on a new plan");
    eprintln!("new leader {new_leader} in {took:?} (term {new_term}, epoch {new_epoch})");
    assert_ne!(new_leader, leader);
    assert!(new_term > term && new_epoch > epoch);
    assert!(took < Duration::from_secs(8), "took {took:?}");

    // The killed node restarts from its data directory and rejoins.
    let survivor_addr = rest[0].data.clone();
    let seed_addr = read_status(&survivor_addr).unwrap().listen.to_string();
    let n = leader.0;
    assert_eq!(killed_data, dir.path().join(format!("d{n}")));
    assert_eq!(killed_identity, dir.path().join(format!("n{n}")));
    let (back, _) = start(dir.path(), n, Some(&seed_addr));
    procs[li] = Some(back);
    let all: Vec<&Proc> = procs.iter().flatten().collect();
    let (_, last_term, last_epoch, _) =
        wait_agreed(&all, 3, Duration::from_secs(30)).expect("the restarted node rejoins");
    assert!(last_epoch > new_epoch);
    assert!(last_term >= new_term);
    let st = read_status(&all[li].data).unwrap();
    assert!(st.membership.term >= term, "its term never went back");
}

#[test]
fn two_processes_with_one_identity_are_detected_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    identities(dir.path(), 1, NodeId);
    // The same identity directory, as on a copied image, with its own data.
    let (a, addr) = start_as(dir.path(), "da", "n1", None);
    let (b, _) = start_as(dir.path(), "db", "n1", Some(&addr));
    let start = Instant::now();
    let mut seen = (false, false);
    while start.elapsed() < Duration::from_secs(15) && !(seen.0 && seen.1) {
        seen.0 |= read_status(&a.data).is_ok_and(|s| s.duplicate_id.is_some());
        seen.1 |= read_status(&b.data).is_ok_and(|s| s.duplicate_id.is_some());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(seen, (true, true), "both processes report the shared id");
    // `loip status` prints it.
    let o = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["status", "--data-dir"])
        .arg(&a.data)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("two devices share one identity"));
}
