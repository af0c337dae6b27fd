//! The ring under `loip run`, with real processes on 127.0.0.1 and the
//! real SmolLM2: requests sent with `loip ask` to any node come back with
//! the tokens of the single-node engine (`loip generate`), also when a
//! member is killed mid-generation (the request resumes on the next plan
//! epoch), after the killed node rejoins, and when a member falls so far
//! behind that it stalls the ring (it is planned out); a request fails with
//! a clear error when the nodes left cannot hold the model.
//!
//! Budgets of 50–60 MiB a node make every plan stream some layers. Each
//! ring runs one compute thread (`LOIP_RING_THREADS=1`): the compute
//! pool's workers spin, and three processes share two cores.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::cluster::{emu_device, identities, logs, wait_for, NodeFiles, Proc};
use loip::cluster::shell::{read_status, NodeStatus};
use loip::net::NodeId;

/// One cluster at a time: failure detection runs on wall-clock time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Cluster {
    dir: tempfile::TempDir,
    model: PathBuf,
    budget: &'static str,
}

impl Cluster {
    fn new(nodes: u64, budget: &'static str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        identities(dir.path(), nodes, NodeId);
        Cluster {
            dir,
            model: common::smollm2(),
            budget,
        }
    }

    /// Starts node `n` (seeded with `peer`); returns it and its address.
    fn start(&self, n: u64, peer: Option<&str>) -> (Proc, String) {
        self.start_with(n, peer, self.budget, &[], &[])
    }

    /// [`Cluster::start`] with a budget, flags and environment of its own.
    fn start_with(
        &self,
        n: u64,
        peer: Option<&str>,
        budget: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> (Proc, String) {
        let mut files = NodeFiles::numbered(self.dir.path(), n);
        // A file of its own for each start: a restarted node's log stays.
        files.stderr = self.dir.path().join(format!("stderr{n}-{}", now_ms()));
        let mut cmd = files.command(3, peer);
        cmd.arg("--no-mdns")
            .arg("--device")
            .arg(emu_device(n))
            .args(["--mem-budget", budget])
            .args(flags)
            .arg("--model")
            .arg(&self.model)
            .env("RUST_LOG", "info")
            .env("LOIP_RING_THREADS", "1")
            .envs(env.iter().copied());
        files.spawn(&mut cmd)
    }

    fn three(&self) -> Vec<Proc> {
        let (p1, seed) = self.start(1, None);
        let (p2, _) = self.start(2, Some(&seed));
        let (p3, _) = self.start(3, Some(&seed));
        vec![p1, p2, p3]
    }

    /// Three nodes, once their rings run one plan.
    fn three_serving(&self) -> (Vec<Proc>, Vec<NodeStatus>) {
        let procs = self.three();
        let all: Vec<&Proc> = procs.iter().collect();
        let st = wait_for(&all, Duration::from_secs(40), "rings running", |s| {
            serving(s, 3)
        });
        (procs, st)
    }
}

/// A ring member that is not the head (to kill), and another node (to ask).
fn victim_and_entry(st: &[NodeStatus]) -> (usize, usize) {
    let head = head_of(st);
    let victim = st
        .iter()
        .position(|s| s.id != head && !s.windows.is_empty())
        .expect("a member that is not the head");
    (victim, (0..3).find(|&i| i != victim).unwrap())
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// All nodes committed the same epoch of `members`, and every ring member
/// runs that epoch's ring.
fn serving(st: &[NodeStatus], members: usize) -> bool {
    let first = &st[0].membership;
    first.committed.members.len() == members
        && st.iter().all(|s| {
            let m = &s.membership;
            m.committed == first.committed
                && m.pending.is_none()
                && s.plan.as_ref().map(|p| p.epoch) == Some(m.committed.epoch)
                && (s.windows.is_empty()
                    || s.ring.as_ref().map(|r| r.epoch) == Some(m.committed.epoch))
        })
}

/// The single-node engine's tokens for `prompt`.
fn reference(model: &Path, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let o = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["generate", "--threads", "1", "--json", "--model"])
        .arg(model)
        .arg("--prompt-ids")
        .arg(ids(prompt))
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    tokens_of(&v)
}

fn tokens_of(v: &serde_json::Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn ids(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn ask_cmd(data: &Path, prompt: &[u32], max_tokens: usize) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loip"));
    c.args(["ask", "--timeout", "60", "--data-dir"])
        .arg(data)
        .arg("--prompt-ids")
        .arg(ids(prompt))
        .args(["--max-tokens", &max_tokens.to_string()]);
    c
}

/// `loip ask --json` on `data`: the answer, or the error text.
fn ask(data: &Path, prompt: &[u32], max_tokens: usize) -> Result<serde_json::Value, String> {
    let o = ask_cmd(data, prompt, max_tokens)
        .arg("--json")
        .output()
        .unwrap();
    if o.status.success() {
        Ok(serde_json::from_slice(&o.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

const PROMPTS: [&[u32]; 3] = [
    &[1, 504, 3458, 282, 4811, 314, 2, 28, 1085],
    &[1, 9690, 198, 2683, 359, 253, 5356, 5646],
    &[504, 905, 314, 253, 1379, 282, 11746, 7541],
];

/// The ring member whose windows include the first: the head.
fn head_of(st: &[NodeStatus]) -> NodeId {
    st.iter()
        .find(|s| {
            s.plan
                .as_ref()
                .is_some_and(|p| p.windows.iter().any(|w| w.index == 0))
        })
        .map(|s| s.id)
        .expect("a head")
}

fn streams(st: &[NodeStatus]) -> bool {
    st.iter().any(|s| {
        s.plan
            .as_ref()
            .is_some_and(|p| p.windows.iter().any(|w| w.streamed.iter().any(|&x| x)))
    })
}

#[test]
fn three_nodes_answer_on_any_node_exactly_as_one_node_with_concurrent_requests() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3, "60MiB");
    let (procs, st) = c.three_serving();
    let all: Vec<&Proc> = procs.iter().collect();
    assert!(streams(&st), "the plan streams layers: {st:#?}");
    assert!(st.iter().filter(|s| !s.windows.is_empty()).count() >= 2);
    let want: Vec<Vec<u32>> = PROMPTS.iter().map(|p| reference(&c.model, p, 40)).collect();
    // One request per node, at once: the head's own and forwarded ones.
    let handles: Vec<_> = PROMPTS
        .iter()
        .zip(&procs)
        .map(|(p, n)| {
            let (data, p) = (n.data.clone(), p.to_vec());
            std::thread::spawn(move || ask(&data, &p, 40))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let v = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("ask {i}: {e}{}", logs(&all)));
        assert_eq!(tokens_of(&v), want[i], "prompt {i} on node {}", i + 1);
        assert_eq!(v["epochs"].as_array().unwrap().len(), 1);
    }
}

#[test]
fn a_member_killed_mid_generation_is_planned_out_the_request_resumes_exactly_and_it_rejoins() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3, "60MiB");
    let (mut procs, st) = c.three_serving();
    let epoch = st[0].membership.committed.epoch;
    // Ask a node that stays; kill a ring member that is not the head.
    let (victim, entry) = victim_and_entry(&st);
    let prompt = PROMPTS[0];
    let want = reference(&c.model, prompt, 200);
    let mut a = ask_cmd(&procs[entry].data, prompt, 200)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Tokens are printed as they come: kill once 20 have.
    let mut out = a.stdout.take().unwrap();
    let mut text = String::new();
    let mut b = [0u8; 1];
    let t0 = Instant::now();
    while text.matches(',').count() < 20 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no tokens: {text}");
        assert_eq!(out.read(&mut b).unwrap(), 1, "ask ended early: {text}");
        text.push(b[0] as char);
    }
    procs[victim].child.kill().unwrap();
    out.read_to_string(&mut text).unwrap();
    assert!(a.wait().unwrap().success(), "{text}");
    let got: Vec<u32> = text.trim().split(',').map(|t| t.parse().unwrap()).collect();
    assert_eq!(got, want, "the tokens of a run without the kill");
    let alive: Vec<&Proc> = (0..3).filter(|&i| i != victim).map(|i| &procs[i]).collect();
    let st = wait_for(&alive, Duration::from_secs(30), "a plan without it", |s| {
        serving(s, 2) && s[0].membership.committed.epoch > epoch
    });
    let epoch2 = st[0].membership.committed.epoch;
    // Restarted on its data directory: it is planned in again.
    let seed_addr = read_status(&alive[0].data).unwrap().listen.to_string();
    let (p, _) = c.start(victim as u64 + 1, Some(&seed_addr));
    procs[victim] = p;
    let all: Vec<&Proc> = procs.iter().collect();
    let st = wait_for(&all, Duration::from_secs(40), "rejoined", |s| {
        serving(s, 3) && s[0].membership.committed.epoch > epoch2
    });
    assert!(st[victim].ring.is_some(), "it runs its windows again");
    let v = ask(&procs[victim].data, PROMPTS[1], 30).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens_of(&v), reference(&c.model, PROMPTS[1], 30));
}

#[test]
fn a_member_restarted_at_once_is_reached_on_its_ring_port_and_answers_stay_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3, "60MiB");
    let (mut procs, st) = c.three_serving();
    let epoch = st[0].membership.committed.epoch;
    let (victim, entry) = victim_and_entry(&st);
    let port = st[victim].ring_listen.expect("a ring endpoint").port();
    let seed_addr = st[entry].listen.to_string();
    // A request first, so that the ring has gone many steps: the
    // restarted member's ring starts at step 1 and must catch up.
    let want = reference(&c.model, PROMPTS[1], 40);
    let v = ask(&procs[entry].data, PROMPTS[1], 40).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens_of(&v), want);
    // Killed and restarted at once, as systemd restarts a crashed service:
    // often within the failure detector's 1.7 s, so still in the epoch.
    procs[victim].child.kill().unwrap();
    procs[victim].child.wait().unwrap();
    let t0 = Instant::now();
    let (p, _) = c.start(victim as u64 + 1, Some(&seed_addr));
    let back_in = t0.elapsed();
    procs[victim] = p;
    let all: Vec<&Proc> = procs.iter().collect();
    let st = wait_for(&all, Duration::from_secs(40), "serving again", |s| {
        serving(s, 3)
    });
    assert_eq!(
        st[victim].ring_listen.map(|a| a.port()),
        Some(port),
        "the ring port of the run before"
    );
    let same_epoch = st[0].membership.committed.epoch == epoch;
    eprintln!("back in {back_in:?}; same epoch: {same_epoch}");
    let t0 = Instant::now();
    let v = ask(&procs[entry].data, PROMPTS[1], 40).unwrap_or_else(|e| panic!("{e}{}", logs(&all)));
    let took = t0.elapsed();
    eprintln!("answered in {took:?}");
    assert_eq!(tokens_of(&v), want, "exact after the restart");
    // Not a timing test: the bound is far above a resubmission (3 s), and
    // far below the 30 s a ring out of step waited before giving up.
    assert!(
        took < Duration::from_secs(20),
        "answered in {took:?}{}",
        logs(&all)
    );
}

#[test]
fn a_request_fails_with_a_clear_error_when_the_nodes_left_cannot_hold_the_model() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3, "50MiB");
    let (mut procs, st) = c.three_serving();
    assert!(
        st.iter().all(|s| !s.windows.is_empty()),
        "the model needs all three: {st:#?}"
    );
    let entry = 0;
    let mut a = ask_cmd(&procs[entry].data, PROMPTS[0], 400)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    procs[2].child.kill().unwrap();
    let all: Vec<&Proc> = procs.iter().take(2).collect();
    let t0 = Instant::now();
    let o = loop {
        if let Some(_s) = a.try_wait().unwrap() {
            break a.wait_with_output().unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "the request neither ended nor failed{}",
            logs(&all)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.contains("does not fit") && err.contains("memory"),
        "a clear error: {err}"
    );
    // And a new request fails at once, with the same reason.
    let t = Instant::now();
    let e = ask(&procs[entry].data, PROMPTS[1], 5).unwrap_err();
    assert!(e.contains("does not fit"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_member_that_stalls_the_ring_is_planned_out_and_the_request_completes_exactly() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3, "60MiB");
    // Node 3 has room for the whole model, so the plan gives it windows;
    // but it computes 500 times slower than its profile says (a device
    // that fell behind). Every node calls itself stalled after 2 s.
    let stall = ["--stall-s", "2"];
    let (p1, seed) = c.start_with(1, None, "60MiB", &stall, &[]);
    let (p2, _) = c.start_with(2, Some(&seed), "60MiB", &stall, &[]);
    let (p3, _) = c.start_with(
        3,
        Some(&seed),
        "400MiB",
        &stall,
        &[("LOIP_TEST_COMPUTE_FACTOR", "500")],
    );
    let procs = [p1, p2, p3];
    let all: Vec<&Proc> = procs.iter().collect();
    let st = wait_for(&all, Duration::from_secs(40), "rings running", |s| {
        serving(s, 3)
    });
    assert!(!st[2].windows.is_empty(), "node 3 holds windows: {st:#?}");
    let epoch = st[0].membership.committed.epoch;
    let want = reference(&c.model, PROMPTS[0], 30);
    let v = ask(&procs[0].data, PROMPTS[0], 30).unwrap_or_else(|e| panic!("{e}{}", logs(&all)));
    assert_eq!(tokens_of(&v), want, "the tokens of one node");
    assert!(
        v["epochs"].as_array().unwrap().len() >= 2,
        "it resumed on a later plan: {v}"
    );
    // The plan now leaves node 3 out, says why, and the other two serve.
    let st = wait_for(&all, Duration::from_secs(30), "a plan without it", |s| {
        serving(s, 3) && s[0].membership.committed.epoch > epoch && s[2].windows.is_empty()
    });
    let plan = st[0].plan.as_ref().unwrap();
    assert!(!plan.kept_unfit);
    assert_eq!(plan.unfit.len(), 1, "{plan:?}");
    assert_eq!(plan.unfit[0].0, st[2].id);
    assert!(plan.unfit[0].1.contains("stalled"), "{plan:?}");
    let text = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["status", "--data-dir"])
        .arg(&procs[0].data)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("planned out: its ring stalled"), "{text}");
    // It serves on without node 3, fast: a request now takes one epoch.
    let v = ask(&procs[1].data, PROMPTS[1], 20).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens_of(&v), reference(&c.model, PROMPTS[1], 20));
    assert_eq!(v["epochs"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn a_link_throttled_mid_run_makes_the_leader_plan_again_and_answers_stay_exact() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::new(3, "60MiB");
    // Each node answers probes (and its next rings send) as if behind the
    // emulated link in its file: none at first.
    let file = |n: u64| c.dir.path().join(format!("link{n}"));
    let knob = |n: u64| file(n).to_str().unwrap().to_string();
    for n in 1..=3 {
        std::fs::write(file(n), "").unwrap();
    }
    let (k1, k2, k3) = (knob(1), knob(2), knob(3));
    let (p1, seed) = c.start_with(1, None, "60MiB", &[], &[("LOIP_TEST_LINK_FILE", &k1)]);
    let (p2, _) = c.start_with(
        2,
        Some(&seed),
        "60MiB",
        &[],
        &[("LOIP_TEST_LINK_FILE", &k2)],
    );
    let (p3, _) = c.start_with(
        3,
        Some(&seed),
        "60MiB",
        &[],
        &[("LOIP_TEST_LINK_FILE", &k3)],
    );
    let mut procs = [p1, p2, p3];
    let all: Vec<&Proc> = procs.iter().collect();
    // A plan made before every member reported is made again once they
    // have: wait for that one, so that only the links can move it.
    let st = wait_for(
        &all,
        Duration::from_secs(40),
        "rings running a plan made with every report",
        |s| {
            serving(s, 3)
                && s.iter().all(|n| {
                    n.plan.as_ref().is_some_and(|p| {
                        p.planned_with.len() == s[0].membership.committed.members.len()
                    })
                })
        },
    );
    let leader = st[0].membership.leader.expect("a leader");
    let victim = st
        .iter()
        .position(|s| s.id != leader && !s.windows.is_empty())
        .expect("a ring member that does not lead");
    let entry = st.iter().position(|s| s.id == leader).unwrap();
    let epoch = st[0].membership.committed.epoch;
    // The leader probes while the plan runs; a steady link re-plans
    // nothing for a while.
    std::thread::sleep(Duration::from_secs(8));
    let st = read_status(&procs[entry].data).unwrap();
    assert_eq!(
        st.membership.committed.epoch,
        epoch,
        "no re-plan on a steady link{}",
        logs(&all)
    );
    assert!(
        st.links
            .iter()
            .any(|l| l.peer == all_ids(&all)[victim] && l.age_s < 10.0),
        "the leader measures the link continuously: {:?}",
        st.links
    );
    // The victim's link drops to 2 Mbit/s and 100 ms, with a request on.
    std::fs::write(file(victim as u64 + 1), "2mbit/100ms").unwrap();
    let want = reference(&c.model, PROMPTS[2], 120);
    let (data, prompt) = (procs[entry].data.clone(), PROMPTS[2].to_vec());
    let asking = std::thread::spawn(move || ask(&data, &prompt, 120));
    let st = wait_for(
        &all,
        Duration::from_secs(60),
        "a plan without the slow link",
        |s| {
            serving(s, 3) && s[0].membership.committed.epoch > epoch && s[victim].windows.is_empty()
        },
    );
    let v = asking
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}{}", logs(&all)));
    assert_eq!(tokens_of(&v), want, "exact across the re-plan");
    let log = std::fs::read_to_string(&procs[entry].stderr).unwrap();
    assert!(
        log.contains("under the links as measured now another plan"),
        "the leader says why it planned again{}",
        logs(&all)
    );
    let slow = st[entry]
        .links
        .iter()
        .find(|l| l.peer == st[victim].id)
        .expect("the victim's link")
        .clone();
    assert!(
        slow.bandwidth_bps < 20e6 && slow.latency_s > 0.05,
        "{slow:?}"
    );
    let v = ask(&procs[victim].data, PROMPTS[1], 20).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens_of(&v), reference(&c.model, PROMPTS[1], 20));
    // The leader's estimates survive its restart: the slow link is known
    // before it could probe anything.
    let n = entry as u64 + 1;
    let _ = procs[entry].child.kill();
    let _ = procs[entry].child.wait();
    let seed = read_status(&procs[(entry + 1) % 3].data)
        .unwrap()
        .listen
        .to_string();
    let kn = knob(n);
    let (p, _) = c.start_with(
        n,
        Some(&seed),
        "60MiB",
        &[],
        &[("LOIP_TEST_LINK_FILE", &kn)],
    );
    procs[entry] = p;
    let t0 = Instant::now();
    let resumed = loop {
        if let Ok(s) = read_status(&procs[entry].data) {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no status");
        std::thread::sleep(Duration::from_millis(50));
    };
    let l = resumed
        .links
        .iter()
        .find(|l| l.peer == slow.peer)
        .unwrap_or_else(|| panic!("estimates resumed: {:?}", resumed.links));
    assert!(l.bandwidth_bps < 20e6 && l.age_s >= 0.0, "{l:?}");
    let log = std::fs::read_to_string(&procs[entry].stderr).unwrap();
    assert!(
        log.contains("resumed the link estimates of 2 peers"),
        "{log}"
    );
}

fn all_ids(procs: &[&Proc]) -> Vec<NodeId> {
    procs
        .iter()
        .map(|p| read_status(&p.data).unwrap().id)
        .collect()
}
