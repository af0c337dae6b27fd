//! Real clients against `loip serve`: the official `openai` Python package,
//! and the chat page in headless Chromium. Each needs software outside
//! cargo (scripts/setup-test.sh installs it); without it the test says
//! what is missing and passes, unless `LOIP_REQUIRE_CLIENTS` is set (CI).

mod serve_util;

use std::path::Path;
use std::process::Command;

use serve_util::Server;

/// Whether `python3` can import `module`; prints why not.
fn have(module: &str, also: &[&str]) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    let missing: Vec<&str> = also
        .iter()
        .copied()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if ok && missing.is_empty() {
        return true;
    }
    let why = format!(
        "skipped: needs the python module {module} ({}) and {also:?} (missing: {missing:?}); \
         run scripts/setup-test.sh",
        if ok { "present" } else { "missing" }
    );
    if std::env::var_os("LOIP_REQUIRE_CLIENTS").is_some() {
        panic!("{why}");
    }
    eprintln!("{why}");
    false
}

fn run_script(script: &str, args: &[&str]) {
    let out = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{script} failed:\n{text}");
}

#[test]
fn openai_python_client() {
    if !have("openai", &[]) {
        return;
    }
    let server = Server::start(&["--api-key", "test-key"]);
    run_script("serve_openai.py", &[&format!("http://{}/v1", server.addr)]);
}

#[test]
fn chat_page_in_headless_chromium() {
    if !have("selenium", &["/usr/bin/chromium", "/usr/bin/chromedriver"]) {
        return;
    }
    let server = Server::start(&[]);
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/serve-chat-page.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    run_script(
        "serve_browser.py",
        &[&format!("http://{}/", server.addr), shot.to_str().unwrap()],
    );
    assert!(shot.exists());
}
