//! The appliance (issue: systemd service, provisioning): `loip flash` onto a
//! directory tree, a loop-mounted image and a full disk; the unit file
//! through `systemd-analyze verify`; readiness and the watchdog over a real
//! sd_notify socket; a node started from the flashed tree.
//!
//! Tests that need root (mounts, chroot) or a tool that is missing print why
//! they skip; CI runs as root with the tools installed.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use loip::cluster::config::FileConfig;
use loip::model::gguf::Gguf;
use loip::model::synth::SynthSpec;
use loip::net::identity::{cluster_fingerprint, NodeIdentity};
use loip::store::atomic::TEMP_MARK;

const LOIP: &str = env!("CARGO_BIN_EXE_loip");

fn loip(args: &[&str]) -> Output {
    Command::new(LOIP)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running loip")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn is_root() -> bool {
    // SAFETY: a plain getter.
    unsafe { libc::geteuid() == 0 }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A CA, a root-like target and a small model.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let f = Fixture { dir };
        let o = loip(&["provision", "ca", "--out", &f.s("ca")]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        SynthSpec::preset("tiny")
            .unwrap()
            .write(&f.p("model.gguf"))
            .unwrap();
        f
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn s(&self, rel: &str) -> String {
        self.p(rel).to_string_lossy().into_owned()
    }
    fn root(&self, name: &str) -> PathBuf {
        let r = self.p(name);
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("usr")).unwrap();
        r
    }
}

fn flash(target: &Path, ca: &str, extra: &[&str]) -> Output {
    let t = target.to_string_lossy().into_owned();
    let mut args = vec!["flash", "--target", &t, "--ca", ca];
    args.extend_from_slice(extra);
    loip(&args)
}

/// Every file under `dir` with its size, sorted.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), if m.is_file() { m.len() } else { 0 }));
        }
    }
    out.sort();
    out
}

#[test]
fn flash_writes_a_node_that_loads() {
    let f = Fixture::new();
    let root = f.root("root");
    let o = flash(
        &root,
        &f.s("ca"),
        &["--model", &f.s("model.gguf"), "--expect", "3"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("flashed "));

    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("usr/bin/loip"), 0o755);
    assert_eq!(mode("var/lib/loip/identity/node.key"), 0o600);
    assert_eq!(
        std::fs::read(root.join("usr/bin/loip")).unwrap(),
        std::fs::read(LOIP).unwrap()
    );
    assert_eq!(
        std::fs::read(root.join("var/lib/loip/models/model.gguf")).unwrap(),
        std::fs::read(f.p("model.gguf")).unwrap()
    );
    let link =
        std::fs::read_link(root.join("etc/systemd/system/multi-user.target.wants/loip.service"))
            .unwrap();
    assert_eq!(link, Path::new("/etc/systemd/system/loip.service"));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/systemd/system/loip.service")).unwrap(),
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/loip.service"))
            .unwrap()
    );
    assert!(
        std::fs::read_to_string(root.join("usr/lib/sysusers.d/loip.conf"))
            .unwrap()
            .starts_with("u loip ")
    );

    // The config is what `loip run` accepts, with the target's paths.
    let cfg = FileConfig::load(&root.join("etc/loip/loip.toml"))
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(cfg.data_dir, Path::new("/var/lib/loip"));
    assert_eq!(cfg.identity, Path::new("/var/lib/loip/identity"));
    assert_eq!(
        cfg.model.as_deref(),
        Some(Path::new("/var/lib/loip/models/model.gguf"))
    );
    assert_eq!(cfg.expect, 3);

    // The identity is this cluster's.
    let ident = NodeIdentity::load(&root.join("var/lib/loip/identity")).unwrap();
    let ca = NodeIdentity::load(&root.join("var/lib/loip/identity"))
        .unwrap()
        .ca;
    let ca_pem = std::fs::read(f.p("ca/ca.crt")).unwrap();
    use rustls_pki_types::pem::PemObject;
    let ours = rustls_pki_types::CertificateDer::from_pem_slice(&ca_pem).unwrap();
    assert_eq!(cluster_fingerprint(&ca), cluster_fingerprint(&ours));

    // Flashing again with the same CA keeps the node's id.
    let o = flash(&root, &f.s("ca"), &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("keep "));
    let again = NodeIdentity::load(&root.join("var/lib/loip/identity")).unwrap();
    assert_eq!(again.id, ident.id);
    // No temporary file is left anywhere.
    for (p, _) in tree(&root) {
        assert!(
            !p.file_name().unwrap().to_string_lossy().contains(TEMP_MARK),
            "left behind: {}",
            p.display()
        );
    }
}

#[test]
fn flash_a_planned_device_gets_only_its_units() {
    let f = Fixture::new();
    let root = f.root("root");
    let src = Gguf::open(&f.p("model.gguf")).unwrap();
    let n_layer = src
        .tensors()
        .iter()
        .filter(|t| t.name.ends_with(".attn_norm.weight"))
        .count();
    assert!(n_layer >= 2);
    // The second layer and the head.
    let units = format!("1,{n_layer}");
    let o = flash(
        &root,
        &f.s("ca"),
        &["--model", &f.s("model.gguf"), "--units", &units],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let part = Gguf::open(&root.join("var/lib/loip/models/model.gguf")).unwrap();
    let names: Vec<&str> = part.tensors().iter().map(|t| t.name.as_str()).collect();
    assert!(names.iter().any(|n| n.starts_with("blk.1.")));
    assert!(!names.iter().any(|n| n.starts_with("blk.0.")));
    assert!(names.contains(&"output_norm.weight"));
    for t in part.tensors() {
        let s = src.tensor(&t.name).unwrap();
        assert_eq!(part.tensor_data(t), src.tensor_data(s), "{}", t.name);
    }
    // Every metadata key is kept.
    assert_eq!(part.metadata().len(), src.metadata().len());

    for bad in ["x", "3-1", "0-999"] {
        let o = flash(
            &root,
            &f.s("ca"),
            &["--model", &f.s("model.gguf"), "--units", bad],
        );
        assert!(!o.status.success());
        let e = text(&o.stderr);
        assert!(e.contains("units") && e.lines().count() == 1, "{e}");
    }
}

#[test]
fn flash_refuses_what_it_must_not_touch() {
    let f = Fixture::new();
    // Not a root filesystem.
    let plain = f.p("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let o = flash(&plain, &f.s("ca"), &[]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("does not look like a root filesystem"), "{e}");
    assert!(
        std::fs::read_dir(&plain).unwrap().next().is_none(),
        "wrote into {plain:?}"
    );

    // Another cluster's identity.
    let root = f.root("root");
    let o = flash(&root, &f.s("ca"), &[]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let first = NodeIdentity::load(&root.join("var/lib/loip/identity")).unwrap();
    let o = loip(&["provision", "ca", "--out", &f.s("other-ca")]);
    assert!(o.status.success());
    let o = flash(&root, &f.s("other-ca"), &[]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(
        e.contains("another cluster") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(
        NodeIdentity::load(&root.join("var/lib/loip/identity"))
            .unwrap()
            .id,
        first.id,
        "the refused flash changed the identity"
    );
    let o = flash(&root, &f.s("other-ca"), &["--force"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let replaced = NodeIdentity::load(&root.join("var/lib/loip/identity")).unwrap();
    assert_ne!(
        cluster_fingerprint(&replaced.ca),
        cluster_fingerprint(&first.ca)
    );
}

#[test]
fn dry_run_writes_nothing() {
    let f = Fixture::new();
    let root = f.root("root");
    let before = tree(&root);
    let o = flash(
        &root,
        &f.s("ca"),
        &["--model", &f.s("model.gguf"), "--dry-run"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("usr/bin/loip") && out.contains("dry run: nothing written"),
        "{out}"
    );
    assert_eq!(tree(&root), before);
}

/// A mount that undoes itself.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], at: &Path) -> Result<Mount, String> {
    std::fs::create_dir_all(at).unwrap();
    let o = Command::new("mount")
        .args(args)
        .arg(at)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(Mount(at.to_path_buf()))
    } else {
        Err(text(&o.stderr).trim().to_string())
    }
}

#[test]
fn a_full_disk_fails_cleanly() {
    if !is_root() {
        println!("SKIP a_full_disk_fails_cleanly: mounting a small tmpfs needs root");
        return;
    }
    let f = Fixture::new();
    let at = f.p("small");
    let _m = match mount(&["-t", "tmpfs", "-o", "size=2m", "tmpfs"], &at) {
        Ok(m) => m,
        Err(e) => {
            println!("SKIP a_full_disk_fails_cleanly: cannot mount tmpfs: {e}");
            return;
        }
    };
    std::fs::create_dir_all(at.join("etc")).unwrap();
    std::fs::create_dir_all(at.join("usr")).unwrap();
    // The binary alone is larger than the disk.
    let o = flash(&at, &f.s("ca"), &["--model", &f.s("model.gguf")]);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("No space left on device"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains("usr/bin/loip"), "the error names the file: {e}");
    assert!(
        !at.join("usr/bin/loip").exists(),
        "a partial binary was left"
    );
    for (p, _) in tree(&at) {
        assert!(
            !p.file_name().unwrap().to_string_lossy().contains(TEMP_MARK),
            "left behind: {}",
            p.display()
        );
    }
}

#[test]
fn a_killed_flash_leaves_no_file_the_node_would_trust() {
    let f = Fixture::new();
    let root = f.root("root");
    let model = f.s("model.gguf");
    let want = std::fs::read(LOIP).unwrap();
    // Kill at a range of moments; whatever was written under a final name
    // must be whole.
    for delay_ms in [5u64, 20, 60, 150] {
        let mut child = Command::new(LOIP)
            .args([
                "flash",
                "--target",
                &root.to_string_lossy(),
                "--ca",
                &f.s("ca"),
            ])
            .args(["--model", &model])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        if let Ok(b) = std::fs::read(root.join("usr/bin/loip")) {
            assert!(
                b == want,
                "a partial binary under its final name ({delay_ms} ms)"
            );
        }
        if root.join("var/lib/loip/identity").exists() {
            NodeIdentity::load(&root.join("var/lib/loip/identity")).unwrap();
        }
        if let Ok(text) = std::fs::read_to_string(root.join("etc/loip/loip.toml")) {
            FileConfig::parse(Path::new("loip.toml"), &text).unwrap();
        }
    }
    // A flash after the kills completes.
    let o = flash(&root, &f.s("ca"), &["--model", &model]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(root.join("usr/bin/loip")).unwrap(), want);
}

#[test]
fn flash_onto_a_loop_mounted_image() {
    if !is_root() || !have("qemu-img") || !have("mkfs.ext4") {
        println!("SKIP flash_onto_a_loop_mounted_image: needs root, qemu-img and mkfs.ext4");
        return;
    }
    let f = Fixture::new();
    let img = f.s("node.img");
    let o = Command::new("qemu-img")
        .args(["create", "-f", "raw", &img, "256M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", &img])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let at = f.p("mnt");
    let files = {
        let _m = match mount(&["-o", "loop", &img], &at) {
            Ok(m) => m,
            Err(e) => {
                println!("SKIP flash_onto_a_loop_mounted_image: loop mount refused: {e}");
                return;
            }
        };
        std::fs::create_dir_all(at.join("etc")).unwrap();
        std::fs::create_dir_all(at.join("usr")).unwrap();
        let o = flash(&at, &f.s("ca"), &["--model", &f.s("model.gguf")]);
        assert!(o.status.success(), "{}", text(&o.stderr));
        tree(&at)
    };
    // Mounted again, the image holds the same node.
    let _m = mount(&["-o", "loop,ro", &img], &at).unwrap();
    assert_eq!(tree(&at), files);
    NodeIdentity::load(&at.join("var/lib/loip/identity")).unwrap();
    assert_eq!(
        std::fs::read(at.join("var/lib/loip/models/model.gguf")).unwrap(),
        std::fs::read(f.p("model.gguf")).unwrap()
    );
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        println!("SKIP the_unit_file_passes_systemd_analyze_verify: systemd-analyze is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart exists: point it at the built binary.
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/loip.service"))
            .unwrap()
            .replace("ExecStart=/usr/bin/loip", &format!("ExecStart={LOIP}"));
    let path = dir.path().join("loip.service");
    std::fs::write(&path, unit).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stderr).trim().is_empty(), "{}", text(&o.stderr));
}

/// Reads sd_notify datagrams until `want` has been seen `times` times.
fn wait_for(sock: &UnixDatagram, want: &str, times: usize, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while seen.iter().filter(|m| m.lines().any(|l| l == want)).count() < times {
        assert!(Instant::now() < deadline, "no {want} (seen {seen:?})");
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(text(&buf[..n]));
        }
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_node_signals_readiness_and_feeds_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    assert!(loip(&["provision", "ca", "--out", &d("ca")])
        .status
        .success());
    assert!(
        loip(&["provision", "node", "--ca", &d("ca"), "--out", &d("id")])
            .status
            .success()
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let child = Command::new(LOIP)
        .args(["run", "--data-dir", &d("data"), "--identity", &d("id")])
        .args(["--listen", "127.0.0.1:0", "--expect", "1"])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env("JOURNAL_STREAM", "8:1234")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let mut seen = Vec::new();
    wait_for(&sock, "READY=1", 1, &mut seen);
    let ready = seen.iter().find(|m| m.contains("READY=1")).unwrap();
    assert!(ready.contains("STATUS=node "), "{ready}");
    // Pings every 200 ms: several within a couple of seconds.
    wait_for(&sock, "WATCHDOG=1", 3, &mut seen);
    // Logs carry journal priorities when the journal reads them.
    let _ = child.0.kill();
    let _ = child.0.wait();
    let mut err = String::new();
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    while let Some(Ok(l)) = lines.next() {
        err.push_str(&l);
        err.push('\n');
    }
    for l in err.lines().filter(|l| !l.is_empty()) {
        assert!(
            l.starts_with('<') && l.as_bytes().get(2) == Some(&b'>'),
            "not a journal line: {l:?}"
        );
    }
}

#[test]
fn a_node_starts_from_the_flashed_tree() {
    if !is_root() || !have("unshare") || !have("chroot") {
        println!("SKIP a_node_starts_from_the_flashed_tree: needs root, unshare and chroot");
        return;
    }
    let f = Fixture::new();
    let root = f.root("root");
    let o = flash(
        &root,
        &f.s("ca"),
        &[
            "--model",
            &f.s("model.gguf"),
            "--listen",
            "127.0.0.1:0",
            "--expect",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The flashed tree has the binary but not the C library it links to:
    // lend it the host's, read-only, in a private mount namespace.
    let r = root.to_string_lossy();
    let script = format!(
        "set -e; for d in usr/lib usr/lib64 lib lib64; do \
           if [ -d /$d ] && [ ! -L /$d ]; then mkdir -p {r}/$d && mount --bind -o ro /$d {r}/$d; fi; \
           if [ -L /$d ] && [ ! -e {r}/$d ]; then ln -s $(readlink /$d) {r}/$d; fi; done; \
         mkdir -p {r}/proc {r}/sys {r}/dev {r}/tmp; mount -t proc proc {r}/proc; \
         mount --bind /sys {r}/sys; mount --bind /dev {r}/dev; \
         exec chroot {r} /usr/bin/loip run --config /etc/loip/loip.toml"
    );
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.0.kill();
            let o = child.0.stderr.take().map(|mut e| {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut e, &mut s);
                s
            });
            panic!("the flashed node did not start: {o:?}");
        }
    };
    let ident = NodeIdentity::load(&root.join("var/lib/loip/identity")).unwrap();
    assert!(
        line.starts_with(&format!("node {} listening on 127.0.0.1:", ident.id)),
        "{line}"
    );
    // Its state went where the config says, inside the tree.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !root.join("var/lib/loip/loip.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "no status socket in the flashed tree"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The first status is published on the node's first tick.
    let o = loop {
        let o = loip(&[
            "status",
            "--data-dir",
            &root.join("var/lib/loip").to_string_lossy(),
        ]);
        if o.status.success() || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains(&ident.id.to_string()),
        "{}",
        text(&o.stdout)
    );
}
