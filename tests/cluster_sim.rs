//! Whole clusters of membership state machines in one process, under a
//! simulated network with seeded loss, delay, partitions, pauses, kills and
//! torn crashes (RELIABILITY.md, "The cluster under faults").
//!
//! Checked at every simulated millisecond:
//! - at most one node ever becomes leader in a term;
//! - at most one node acts as leader (holds its lease) at any instant;
//! - persisted terms never go back, and a restarted node resumes from them;
//! - every node that commits epoch e commits the same plan, and each
//!   node's committed epoch only grows;
//! - every node that prepares a plan (a term and an epoch) prepares the
//!   same body, the one its leader computed, and no plan is committed that
//!   no node prepared.
//!
//! And at the end of a run, after every fault is healed: one leader, and
//! every node on the same plan epoch, whose members are all the nodes.
//!
//! A failing seed prints itself; add it to `regressions` below.

use std::collections::{BTreeMap, BTreeSet};

use loip::cluster::{Action, Config, Event, HardState, Msg, Node, NodeConfig, Timing};
use loip::net::NodeId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TICK_MS: u64 = 10;

struct SimNode {
    cfg: NodeConfig,
    node: Option<Node>,
    disk: HardState,
    paused_until: Option<u64>,
    /// Messages that arrived while paused, delivered on resume (as a
    /// stopped process finds them in its socket).
    stash: Vec<(NodeId, Msg)>,
    /// Shell work (prepare, compute) that finished while paused.
    local_stash: Vec<Event>,
    restart_at: Option<u64>,
    committed_epoch: u64,
    tick_phase: u64,
}

#[derive(Clone, Debug)]
enum Local {
    Deliver { from: NodeId, msg: Msg },
    Event(Event),
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    now: u64,
    nodes: Vec<SimNode>,
    index: BTreeMap<NodeId, usize>,
    /// (time, sequence) → (target, what)
    queue: BTreeMap<(u64, u64), (usize, Local)>,
    seq: u64,
    loss: f64,
    delay: (u64, u64),
    blocked: BTreeSet<(usize, usize)>,
    prepare_fail: f64,
    torn_crash: f64,
    leaders: BTreeMap<u64, NodeId>,
    commits: BTreeMap<u64, Config>,
    /// The body of each prepared plan, by (term, epoch).
    bodies: BTreeMap<(u64, u64), Vec<u8>>,
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        let mut index = BTreeMap::new();
        let mut ids = BTreeSet::new();
        while ids.len() < n {
            ids.insert(NodeId(rng.random::<u64>() >> rng.random_range(0..60)));
        }
        for (i, id) in ids.into_iter().enumerate() {
            let cfg = NodeConfig {
                id,
                score: rng.random_range(0..3),
                expect: n,
                timing: Timing::default(),
                seed: rng.random(),
            };
            index.insert(id, i);
            nodes.push(SimNode {
                node: Some(Node::new(cfg.clone(), 0)),
                cfg,
                disk: HardState::default(),
                paused_until: None,
                stash: Vec::new(),
                local_stash: Vec::new(),
                restart_at: None,
                committed_epoch: 0,
                tick_phase: rng.random_range(0..TICK_MS),
            });
        }
        let mut sim = Sim {
            seed,
            rng,
            now: 0,
            nodes,
            index,
            queue: BTreeMap::new(),
            seq: 0,
            loss: 0.0,
            delay: (1, 10),
            blocked: BTreeSet::new(),
            prepare_fail: 0.0,
            torn_crash: 0.0,
            leaders: BTreeMap::new(),
            commits: BTreeMap::new(),
            bodies: BTreeMap::new(),
            trace: Vec::new(),
        };
        for i in 0..n {
            sim.discover_all(i);
        }
        sim
    }

    fn id(&self, i: usize) -> NodeId {
        self.nodes[i].cfg.id
    }

    fn discover_all(&mut self, i: usize) {
        for j in 0..self.nodes.len() {
            if j != i {
                let id = self.id(j);
                self.handle(i, Event::PeerDiscovered(id));
            }
        }
    }

    fn log(&mut self, s: String) {
        if self.trace.len() > 400 {
            self.trace.remove(0);
        }
        self.trace.push(format!("{:>6} {s}", self.now));
    }

    fn fail(&self, what: String) -> ! {
        for line in &self.trace {
            eprintln!("{line}");
        }
        panic!("seed {}, t={}: {what}", self.seed, self.now);
    }

    fn schedule(&mut self, at: u64, to: usize, what: Local) {
        self.seq += 1;
        self.queue.insert((at, self.seq), (to, what));
    }

    fn handle(&mut self, i: usize, event: Event) {
        let now = self.now;
        let Some(node) = self.nodes[i].node.as_mut() else {
            return;
        };
        let actions = node.handle(now, event);
        let mut take = actions.len();
        let torn = self.torn_crash > 0.0 && self.rng.random_bool(self.torn_crash);
        if torn {
            take = self.rng.random_range(0..=actions.len());
        }
        for a in actions.into_iter().take(take) {
            self.apply(i, a);
        }
        if torn {
            self.log(format!("{} torn crash", self.id(i)));
            self.kill(i, 1000);
        }
        self.check_node(i);
    }

    fn apply(&mut self, i: usize, a: Action) {
        let me = self.id(i);
        match a {
            Action::Persist(h) => {
                let old = &self.nodes[i].disk;
                if h.term < old.term {
                    self.fail(format!("{me} persisted term {} after {}", h.term, old.term));
                }
                if h.term == old.term && old.voted_for.is_some() && h.voted_for != old.voted_for {
                    self.fail(format!("{me} changed its vote in term {}", h.term));
                }
                if h.committed.epoch < old.committed.epoch {
                    self.fail(format!("{me} persisted an older committed epoch"));
                }
                self.nodes[i].disk = h;
            }
            Action::Send { to, msg } => {
                let Some(&j) = self.index.get(&to) else {
                    self.fail(format!("{me} sent to unknown {to}"));
                };
                // A message may only leave once what it acknowledges is on disk.
                let term_in_msg = msg_term(&msg);
                if term_in_msg > self.nodes[i].disk.term {
                    self.fail(format!("{me} sent term {term_in_msg} before persisting it"));
                }
                if self.blocked.contains(&(i, j)) || self.rng.random_bool(self.loss) {
                    return;
                }
                let at = self.now + self.rng.random_range(self.delay.0..=self.delay.1);
                self.schedule(at, j, Local::Deliver { from: me, msg });
            }
            Action::BecameLeader { term } => {
                self.log(format!("{me} leader of term {term}"));
                if let Some(&other) = self.leaders.get(&term) {
                    if other != me {
                        self.fail(format!("two leaders in term {term}: {other} and {me}"));
                    }
                }
                self.leaders.insert(term, me);
            }
            Action::SteppedDown { term } => self.log(format!("{me} stepped down in term {term}")),
            Action::ComputePlan { epoch, members } => {
                let ids: Vec<String> = members.iter().map(|m| m.id.to_string()).collect();
                self.log(format!("{me} proposes epoch {epoch} {ids:?}"));
                let at = self.now + self.rng.random_range(0..50);
                self.schedule(
                    at,
                    i,
                    Local::Event(Event::PlanComputed {
                        epoch,
                        // Unique per proposal: no two leaders' bodies match.
                        body: [epoch, me.0, self.now]
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    }),
                );
            }
            Action::Prepare(plan) => {
                let version = plan.config.version();
                match self.bodies.get(&version) {
                    Some(b) if *b != plan.body => self.fail(format!(
                        "{me} prepares plan {version:?} with another body than its leader's"
                    )),
                    Some(_) => {}
                    None => {
                        self.bodies.insert(version, plan.body.clone());
                    }
                }
                let at = self.now + self.rng.random_range(0..300);
                let ok = !self.rng.random_bool(self.prepare_fail);
                self.schedule(
                    at,
                    i,
                    Local::Event(Event::Prepared {
                        epoch: plan.config.epoch,
                        ok,
                    }),
                );
            }
            Action::PlanCommitted(c) => {
                self.log(format!(
                    "{me} committed epoch {} (term {}) {:?}",
                    c.epoch,
                    c.term,
                    c.ids().map(|x| x.to_string()).collect::<Vec<_>>()
                ));
                if c.epoch <= self.nodes[i].committed_epoch {
                    self.fail(format!(
                        "{me} committed epoch {} after {}",
                        c.epoch, self.nodes[i].committed_epoch
                    ));
                }
                self.nodes[i].committed_epoch = c.epoch;
                if !self.bodies.contains_key(&c.version()) {
                    self.fail(format!(
                        "{me} committed epoch {} that nobody prepared",
                        c.epoch
                    ));
                }
                match self.commits.get(&c.epoch) {
                    Some(prev) if *prev != c => {
                        self.fail(format!("epoch {} committed as {prev:?} and {c:?}", c.epoch))
                    }
                    _ => {
                        self.commits.insert(c.epoch, c);
                    }
                }
            }
        }
    }

    fn check_node(&mut self, i: usize) {
        if let Some(node) = &self.nodes[i].node {
            if node.term() < self.nodes[i].disk.term {
                let (t, d) = (node.term(), self.nodes[i].disk.term);
                self.fail(format!("{} term {t} below its persisted {d}", self.id(i)));
            }
        }
    }

    fn kill(&mut self, i: usize, down_ms: u64) {
        if self.nodes[i].node.is_none() {
            return;
        }
        self.log(format!("{} killed", self.id(i)));
        self.nodes[i].node = None;
        self.nodes[i].paused_until = None;
        self.nodes[i].stash.clear();
        self.nodes[i].local_stash.clear();
        self.nodes[i].restart_at = Some(self.now + down_ms);
    }

    fn restart(&mut self, i: usize) {
        self.log(format!("{} restarted", self.id(i)));
        let s = &mut self.nodes[i];
        s.restart_at = None;
        s.node = Some(Node::restore(s.cfg.clone(), s.disk.clone(), self.now));
        // Only the persisted plan survives; what it had committed before
        // but not persisted cannot be lost (commits are persisted first).
        s.committed_epoch = s.disk.committed.epoch;
        self.discover_all(i);
    }

    fn pause(&mut self, i: usize, ms: u64) {
        if self.nodes[i].node.is_some() && self.nodes[i].paused_until.is_none() {
            self.log(format!("{} paused for {ms} ms", self.id(i)));
            self.nodes[i].paused_until = Some(self.now + ms);
        }
    }

    fn running(&self, i: usize) -> bool {
        self.nodes[i].node.is_some() && self.nodes[i].paused_until.is_none()
    }

    fn acting_leaders(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i]
                    .node
                    .as_ref()
                    .is_some_and(|n| n.is_acting_leader(self.now))
            })
            .collect()
    }

    /// Advance one millisecond.
    fn step(&mut self) {
        self.now += 1;
        let now = self.now;
        for i in 0..self.nodes.len() {
            if self.nodes[i].restart_at.is_some_and(|t| t <= now) {
                self.restart(i);
            }
            if self.nodes[i].paused_until.is_some_and(|t| t <= now) {
                self.log(format!("{} resumed", self.id(i)));
                self.nodes[i].paused_until = None;
                for (from, msg) in std::mem::take(&mut self.nodes[i].stash) {
                    self.handle(i, Event::Message { from, msg });
                }
                for e in std::mem::take(&mut self.nodes[i].local_stash) {
                    self.handle(i, e);
                }
            }
        }
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (to, what) = entry.remove();
            if self.nodes[to].node.is_none() {
                continue;
            }
            match what {
                Local::Deliver { from, msg } => {
                    if self.nodes[to].paused_until.is_some() {
                        if self.nodes[to].stash.len() < 10_000 {
                            self.nodes[to].stash.push((from, msg));
                        }
                    } else {
                        self.handle(to, Event::Message { from, msg });
                    }
                }
                Local::Event(e) => {
                    if self.running(to) {
                        self.handle(to, e);
                    } else {
                        // Finished after the pause.
                        self.nodes[to].local_stash.push(e);
                    }
                }
            }
        }
        for i in 0..self.nodes.len() {
            if self.running(i) && now % TICK_MS == self.nodes[i].tick_phase {
                self.handle(i, Event::Tick);
            }
        }
        let acting = self.acting_leaders();
        if acting.len() > 1 {
            let ids: Vec<String> = acting.iter().map(|&i| self.id(i).to_string()).collect();
            self.fail(format!("two acting leaders at once: {ids:?}"));
        }
    }

    fn run_for(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    /// Run until `done` holds, for at most `ms`; the time it took.
    fn run_until(&mut self, ms: u64, mut done: impl FnMut(&Sim) -> bool) -> Option<u64> {
        let start = self.now;
        while self.now < start + ms {
            if done(self) {
                return Some(self.now - start);
            }
            self.step();
        }
        None
    }

    fn heal(&mut self) {
        self.blocked.clear();
        self.loss = 0.0;
        self.prepare_fail = 0.0;
        self.torn_crash = 0.0;
        let now = self.now;
        for s in &mut self.nodes {
            if s.paused_until.is_some() {
                s.paused_until = Some(now + 1);
            }
            if s.restart_at.is_some() {
                s.restart_at = Some(now + 1);
            }
        }
    }

    /// One leader, and every node committed to the same plan holding all.
    fn converged(&self) -> bool {
        let acting = self.acting_leaders();
        if acting.len() != 1 {
            return false;
        }
        let leader = self.nodes[acting[0]].node.as_ref().unwrap();
        let plan = leader.committed();
        if plan.members.len() != self.nodes.len() {
            return false;
        }
        self.nodes.iter().all(|s| {
            s.node.as_ref().is_some_and(|n| {
                let st = n.status(self.now);
                n.committed() == plan
                    && n.leader() == Some(leader.id())
                    && st.pending.is_none()
                    && st.proposing.is_none()
                    && st.peers.iter().all(|&(_, live)| live)
            })
        })
    }

    fn views(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|s| format!("{:?}", s.node.as_ref().map(|n| n.status(self.now))))
            .collect()
    }

    fn pick(&mut self) -> usize {
        self.rng.random_range(0..self.nodes.len())
    }

    /// One random fault.
    fn inject_fault(&mut self) {
        let n = self.nodes.len();
        match self.rng.random_range(0..9) {
            0 => {
                // Symmetric partition into two random sides.
                let side: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        if side[a] != side[b] {
                            self.blocked.insert((a, b));
                        }
                    }
                }
                self.log(format!("partition {side:?}"));
            }
            1 => {
                let (a, b) = (self.pick(), self.pick());
                if a != b {
                    self.blocked.insert((a, b));
                    self.log(format!("one-way {} -/-> {}", self.id(a), self.id(b)));
                }
            }
            2 => {
                if let Some(&l) = self.acting_leaders().first() {
                    for o in 0..n {
                        if o != l {
                            self.blocked.insert((l, o));
                            self.blocked.insert((o, l));
                        }
                    }
                    self.log(format!("isolate leader {}", self.id(l)));
                }
            }
            3 => {
                let i = self.pick();
                let ms = self.rng.random_range(10_000..30_000);
                self.pause(i, ms);
            }
            4 => {
                if let Some(&l) = self.acting_leaders().first() {
                    let ms = self.rng.random_range(10_000..30_000);
                    self.pause(l, ms);
                }
            }
            5 => {
                let i = self.pick();
                let down = self.rng.random_range(500..8_000);
                self.kill(i, down);
            }
            6 => {
                self.blocked.clear();
                self.log("partitions healed".into());
            }
            7 => {
                self.loss = self.rng.random_range(0.0..0.2);
                let d = self.rng.random_range(1..40);
                self.delay = (1, d);
                self.log(format!("loss {:.2} delay 1..{d}", self.loss));
            }
            _ => {
                self.prepare_fail = if self.prepare_fail > 0.0 { 0.0 } else { 0.2 };
            }
        }
    }
}

fn msg_term(msg: &Msg) -> u64 {
    match msg {
        Msg::Beat(b) => b.term,
        Msg::BeatAck { term, .. }
        | Msg::PreVoteReply { term, .. }
        | Msg::VoteReply { term, .. }
        | Msg::Prepare { term, .. }
        | Msg::PrepareReply { term, .. } => *term,
        // A pre-vote names a term it does not hold.
        Msg::PreVote(_) => 0,
        Msg::Vote(r) => r.term,
    }
}

/// Random faults for a while, then heal everything and expect agreement.
fn chaos(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xc4a05);
    let n = rng.random_range(3..=7);
    let mut sim = Sim::new(seed, n);
    sim.delay = (1, rng.random_range(2..30));
    sim.torn_crash = if rng.random_bool(0.3) { 0.0005 } else { 0.0 };
    // Form first.
    if sim.run_until(15_000, Sim::converged).is_none() {
        let views = sim.views();
        sim.fail(format!("seed {seed}: {n} nodes did not form: {views:#?}"));
    }
    let faults = rng.random_range(3..12);
    for _ in 0..faults {
        sim.inject_fault();
        let gap = rng.random_range(200..3_000);
        sim.run_for(gap);
    }
    sim.heal();
    sim.log("healed".into());
    // Suspended nodes (a failed prepare) come back after `suspend_ms`.
    let limit = Timing::default().suspend_ms + 15_000;
    // Agreement that holds for longer than failure detection takes.
    let mut since = None;
    let hold = Timing::default().failure_ms + 500;
    let agreed = sim.run_until(limit, |s| {
        if !s.converged() {
            since = None;
            return false;
        }
        let start = *since.get_or_insert(s.now);
        s.now >= start + hold
    });
    if agreed.is_none() {
        let views = sim.views();
        sim.fail(format!(
            "seed {seed}: no agreement {limit} ms after healing: {views:#?}"
        ));
    }
    // Stable: nothing changes any more.
    let epoch = sim.commits.keys().last().copied();
    sim.run_for(3_000);
    if !sim.converged() || sim.commits.keys().last().copied() != epoch {
        let views = sim.views();
        let acting = sim.acting_leaders();
        let last = sim.commits.keys().last().copied();
        sim.fail(format!(
            "seed {seed}: not stable after agreement (epoch {epoch:?} then {last:?}, acting {acting:?}): {views:#?}"
        ));
    }
}

#[test]
fn chaos_seeds() {
    let count: u64 = std::env::var("LOIP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let base: u64 = std::env::var("LOIP_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    for seed in base..base + count {
        chaos(seed);
    }
}

fn formed(seed: u64, n: usize) -> Sim {
    let mut sim = Sim::new(seed, n);
    let t = sim.run_until(10_000, Sim::converged);
    assert!(t.is_some(), "seed {seed}: {n} nodes did not form");
    sim
}

#[test]
fn every_size_forms_one_plan_with_everyone() {
    for n in 3..=7 {
        for seed in 0..10 {
            let sim = formed(seed, n);
            assert_eq!(sim.leaders.len(), 1, "one election is enough");
        }
    }
}

#[test]
fn the_best_ranked_node_leads_first() {
    for seed in 0..20 {
        let sim = formed(seed, 5);
        let best = sim
            .nodes
            .iter()
            .map(|s| (s.cfg.score, s.cfg.id))
            .max()
            .unwrap()
            .1;
        assert_eq!(sim.leaders.values().next(), Some(&best), "seed {seed}");
    }
}

#[test]
fn a_new_leader_within_3_s_of_killing_the_leader() {
    for seed in 0..40 {
        let n = 3 + (seed as usize % 5);
        let mut sim = formed(seed, n);
        // Up to a minority, killed one after another.
        for _ in 0..(n - 1) / 2 {
            let old = sim.acting_leaders()[0];
            sim.kill(old, 1_000_000);
            let t = sim.run_until(3_000, |s| s.acting_leaders().len() == 1);
            assert!(
                t.is_some(),
                "seed {seed}, {n} nodes: no leader 3 s after a kill"
            );
            // Let the survivors re-plan before the next kill.
            let ok = sim.run_until(5_000, |s| {
                s.acting_leaders().first().is_some_and(|&l| {
                    !s.nodes[l]
                        .node
                        .as_ref()
                        .unwrap()
                        .committed()
                        .contains(s.id(old))
                })
            });
            assert!(
                ok.is_some(),
                "seed {seed}: the dead leader was not planned out"
            );
        }
    }
}

#[test]
fn a_failed_follower_is_detected_and_planned_out() {
    for seed in 0..20 {
        let mut sim = formed(seed, 5);
        let leader = sim.acting_leaders()[0];
        let victim = (leader + 1) % 5;
        let victim_id = sim.id(victim);
        sim.kill(victim, 1_000_000);
        // Detected within failure_ms + a heartbeat; re-planned soon after.
        let t = sim.run_until(3_000, |s| {
            s.acting_leaders().first().is_some_and(|&l| {
                !s.nodes[l]
                    .node
                    .as_ref()
                    .unwrap()
                    .committed()
                    .contains(victim_id)
            })
        });
        assert!(
            t.is_some(),
            "seed {seed}: follower failure not handled in 3 s"
        );
    }
}

#[test]
fn a_paused_leader_is_replaced_and_steps_down_on_resume() {
    for seed in 0..20 {
        let mut sim = formed(seed, 3 + seed as usize % 3);
        let old = sim.acting_leaders()[0];
        let old_term = sim.nodes[old].node.as_ref().unwrap().term();
        sim.pause(old, 10_000 + seed * 1000);
        let t = sim.run_until(3_000, |s| s.acting_leaders().iter().any(|&l| l != old));
        assert!(t.is_some(), "seed {seed}: no new leader during the pause");
        // After resuming it is a follower of a later term; the per-step
        // check has already asserted that it never acted beside the new one.
        sim.run_until(40_000, Sim::converged).expect("rejoins");
        let n = sim.nodes[old].node.as_ref().unwrap();
        assert!(n.term() > old_term);
        assert!(!n.is_acting_leader(sim.now));
    }
}

#[test]
fn a_node_that_fails_to_prepare_is_left_out_then_readmitted() {
    let mut sim = formed(3, 4);
    sim.prepare_fail = 1.0;
    let leader = sim.acting_leaders()[0];
    let victim = (leader + 1) % 4;
    // Force a re-plan: the victim restarts (and prepares nothing).
    sim.kill(victim, 2_000);
    sim.run_for(6_000);
    sim.prepare_fail = 0.0;
    sim.run_until(30_000, Sim::converged).expect("readmitted");
}

#[test]
fn replans_asked_of_the_leader_give_new_epochs_under_loss() {
    for seed in 0..30 {
        let n = 3 + seed as usize % 4;
        let mut sim = formed(seed, n);
        sim.loss = 0.05;
        let start = *sim.commits.keys().last().unwrap();
        for _ in 0..4 {
            // The shell asks any node; only the leader acts on it.
            let i = sim.pick();
            sim.handle(i, Event::Replan);
            if let Some(&l) = sim.acting_leaders().first() {
                sim.handle(l, Event::Replan);
            }
            let gap = sim.rng.random_range(100..1_500);
            sim.run_for(gap);
        }
        sim.heal();
        sim.loss = 0.0;
        sim.run_until(20_000, Sim::converged)
            .unwrap_or_else(|| panic!("seed {seed}: no agreement after replans"));
        let last = *sim.commits.keys().last().unwrap();
        assert!(last > start, "seed {seed}: a replan gave a new epoch");
    }
}

#[test]
fn a_minority_never_elects_a_leader() {
    let mut sim = formed(11, 5);
    // Split 2 | 3 with the leader on the minority side.
    let leader = sim.acting_leaders()[0];
    let minority: BTreeSet<usize> = [leader, (leader + 1) % 5].into();
    for a in 0..5 {
        for b in 0..5 {
            if minority.contains(&a) != minority.contains(&b) {
                sim.blocked.insert((a, b));
            }
        }
    }
    sim.run_for(10_000);
    let acting = sim.acting_leaders();
    assert_eq!(acting.len(), 1);
    assert!(!minority.contains(&acting[0]), "the majority side leads");
    sim.heal();
    sim.run_until(10_000, Sim::converged).expect("heals");
}

/// Seeds that once failed, kept as regression tests:
/// - 0: an abandoned proposal left a stale pending plan on followers;
/// - 85: a leader elected on a pending first plan lost its lease at once;
/// - 1163: nodes with no plan refused a candidate holding the first one;
/// - 421: a restarted node voted while its pre-crash ack still held the
///   old leader's lease (two acting leaders);
/// - 19, 292, 3301, 4197: the simulator's own agreement checks.
#[test]
fn regressions() {
    for seed in [0, 19, 85, 292, 421, 1163, 3301, 4197] {
        chaos(seed);
    }
}

#[test]
fn a_replan_whose_preparation_fails_leaves_the_committed_plan_in_force() {
    for seed in 40..46 {
        let mut sim = formed(seed, 3);
        let before = sim
            .commits
            .iter()
            .next_back()
            .map(|(e, c)| (*e, c.clone()))
            .unwrap();
        sim.prepare_fail = 1.0;
        let l = sim.acting_leaders()[0];
        sim.handle(l, Event::Replan);
        sim.run_for(10_000);
        // Nothing half-done was committed: every node still runs the plan
        // it had, members and all.
        assert_eq!(
            sim.commits.keys().next_back(),
            Some(&before.0),
            "seed {seed}: a failed preparation committed a plan"
        );
        for s in &sim.nodes {
            assert_eq!(
                s.node.as_ref().unwrap().committed(),
                &before.1,
                "seed {seed}"
            );
        }
        // Once preparing works again, the re-plan goes through.
        sim.prepare_fail = 0.0;
        sim.run_until(30_000, Sim::converged)
            .unwrap_or_else(|| panic!("seed {seed}: no plan after preparing works again"));
        assert!(*sim.commits.keys().next_back().unwrap() > before.0);
    }
}
