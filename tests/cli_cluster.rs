//! `loip provision ca|node`, `loip run` and `loip status` end to end: the
//! files, their modes, and one error line for each kind of bad input.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use loip::net::identity::NodeIdentity;
use loip::net::NodeId;

fn loip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running loip")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn provision_a_ca_and_two_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    let o = loip(&["provision", "ca", "--out", &d("ca")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("cluster fingerprint "));
    let mode = std::fs::metadata(dir.path().join("ca/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let o = loip(&[
        "provision",
        "node",
        "--ca",
        &d("ca"),
        "--out",
        &d("n1"),
        "--id",
        "00000000000000aa",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        NodeIdentity::load(&dir.path().join("n1")).unwrap().id,
        NodeId(0xaa)
    );

    let o = loip(&["provision", "node", "--ca", &d("ca"), "--out", &d("n2")]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let n2 = NodeIdentity::load(&dir.path().join("n2")).unwrap();
    assert!(text(&o.stdout).starts_with(&format!("node {}:", n2.id)));
    let mode = std::fs::metadata(dir.path().join("n2/node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Never overwrites: one error line, exit 1.
    let o = loip(&["provision", "node", "--ca", &d("ca"), "--out", &d("n1")]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("already exists"),
        "{err}"
    );
}

#[test]
fn bad_provision_input_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
    // No CA there.
    let o = loip(&["provision", "node", "--ca", &d("nothing"), "--out", &d("n")]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("ca.key"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    // A CA key that is not a key.
    std::fs::create_dir_all(dir.path().join("bad")).unwrap();
    std::fs::write(dir.path().join("bad/ca.key"), "not a key").unwrap();
    std::fs::write(dir.path().join("bad/ca.crt"), "not a cert").unwrap();
    let o = loip(&["provision", "node", "--ca", &d("bad"), "--out", &d("n")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("CA key"), "{}", text(&o.stderr));
    // A malformed id is a usage error.
    let o = loip(&[
        "provision",
        "node",
        "--ca",
        &d("ca"),
        "--out",
        &d("n"),
        "--id",
        "xyz",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("16 hex digits"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn run_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("loip.toml");
    let cases = [
        (
            "data_dir = \"/tmp/x\"\nidentity = \"/tmp/y\"\nlisten_port = 5\n",
            "unknown field `listen_port`",
        ),
        (
            "data_dir = \"/tmp/x\"\nexpect = \"three\"\n",
            "key `expect`",
        ),
        (
            "data_dir = \"/tmp/x\"\nidentity = \"/tmp/y\"\npeers = [\"nohost\"]\n",
            "peers[0]",
        ),
        ("identity = \"/tmp/y\"\n", "data_dir is required"),
    ];
    for (text, want) in cases {
        std::fs::write(&cfg, text).unwrap();
        let o = loip(&["run", "--config", cfg.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{text}");
        let err = text_of(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{text}: {err}"
        );
    }
    // A flag overrides the file, and is checked the same way.
    std::fs::write(&cfg, "data_dir = \"/tmp/x\"\nidentity = \"/tmp/y\"\n").unwrap();
    let o = loip(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "nowhere",
    ]);
    assert!(
        text_of(&o.stderr).contains("listen: "),
        "{}",
        text_of(&o.stderr)
    );
    // A missing identity directory is one line too.
    let o = loip(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text_of(&o.stderr).contains("node.crt"),
        "{}",
        text_of(&o.stderr)
    );
}

#[test]
fn status_without_a_running_node_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let o = loip(&["status", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = text_of(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("loip.sock"), "{err}");
}

fn text_of(b: &[u8]) -> String {
    text(b)
}
