//! Real `loip run` processes on 127.0.0.1, for the tests that run a
//! cluster: the nodes' identities, starting a node and killing it, and
//! waiting on the status each writes to its data directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use loip::cluster::shell::{read_status, NodeStatus};
use loip::net::identity::{create_ca, create_node};
use loip::net::NodeId;

/// Creates a CA in `dir/ca` and, for each node `n` from 1 to `nodes`, its
/// identity in `dir/n{n}` with the id `id(n)`.
pub fn identities(dir: &Path, nodes: u64, id: impl Fn(u64) -> NodeId) {
    create_ca(&dir.join("ca")).unwrap();
    for n in 1..=nodes {
        create_node(&dir.join("ca"), &dir.join(format!("n{n}")), id(n)).unwrap();
    }
}

/// Node `n`'s emulated device: `emu-a`, `emu-b` and `emu-c` in turn.
pub fn emu_device(n: u64) -> PathBuf {
    let devices = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/devices");
    devices.join(["emu-a.toml", "emu-b.toml", "emu-c.toml"][(n as usize - 1) % 3])
}

/// Where a node keeps its state, and where its standard error goes.
pub struct NodeFiles {
    pub data: PathBuf,
    pub identity: PathBuf,
    pub stderr: PathBuf,
}

impl NodeFiles {
    /// Node `n`'s in `dir`: data in `d{n}`, identity in `n{n}` (see
    /// [`identities`]), standard error in `stderr{n}`.
    pub fn numbered(dir: &Path, n: u64) -> NodeFiles {
        NodeFiles {
            data: dir.join(format!("d{n}")),
            identity: dir.join(format!("n{n}")),
            stderr: dir.join(format!("stderr{n}")),
        }
    }

    /// `loip run` on these files, listening on an ephemeral port, waiting
    /// for `expect` nodes and seeded with `peer`, with `RUST_LOG=warn`
    /// (the caller may set another). The caller adds its own flags, then
    /// calls [`NodeFiles::spawn`].
    pub fn command(&self, expect: usize, peer: Option<&str>) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loip"));
        cmd.args(["run", "--listen", "127.0.0.1:0", "--expect"])
            .arg(expect.to_string())
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--identity")
            .arg(&self.identity)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&self.stderr).unwrap());
        if let Some(p) = peer {
            cmd.args(["--peer", p]);
        }
        cmd
    }

    /// Spawns `cmd`, made by [`NodeFiles::command`], and waits for the
    /// node's address ([`super::spawn_node`]); returns the node and it.
    pub fn spawn(self, cmd: &mut Command) -> (Proc, String) {
        let (child, addr) = super::spawn_node(cmd);
        let NodeFiles {
            data,
            identity,
            stderr,
        } = self;
        let proc = Proc {
            child,
            data,
            identity,
            stderr,
        };
        (proc, addr)
    }
}

/// A running node, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub data: PathBuf,
    pub identity: PathBuf,
    pub stderr: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every node's status, or `None` while one has none to read.
pub fn statuses(procs: &[&Proc]) -> Option<Vec<NodeStatus>> {
    procs.iter().map(|p| read_status(&p.data).ok()).collect()
}

/// The nodes' standard error, one after the other.
pub fn logs(procs: &[&Proc]) -> String {
    procs
        .iter()
        .map(|p| std::fs::read_to_string(&p.stderr).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// Polls the nodes' statuses until `ok` holds for them all, and returns
/// them; fails the test with the last statuses and the logs after `limit`.
pub fn wait_for(
    procs: &[&Proc],
    limit: Duration,
    what: &str,
    ok: impl Fn(&[NodeStatus]) -> bool,
) -> Vec<NodeStatus> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < limit {
        if let Some(st) = statuses(procs) {
            if ok(&st) {
                eprintln!("{what}: after {:?}", start.elapsed());
                return st;
            }
            last = Some(st);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "{what}: not within {limit:?}; last statuses {last:#?}{}",
        logs(procs)
    );
}
