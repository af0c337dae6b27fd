//! `loip plan`, `loip profile` and `loip validate` end to end, and the bad
//! input each must turn into one line `error: ...`: device files with
//! missing or impossible values (naming the file and the field), a model
//! that no plan fits (stating the shortfall in bytes), `self` without a
//! stored profile, and a corrupt database (set aside with a warning, never
//! a refusal to start).

mod common;

use std::path::{Path, PathBuf};

use common::cli::{fails, ok, ok_json};
use tempfile::TempDir;

fn devices_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/devices")
}

const JETSONS: [&str; 5] = [
    "agx-orin-64gb",
    "agx-orin-32gb",
    "orin-nx-16gb",
    "orin-nano-8gb",
    "xavier-nx-8gb",
];

fn jetson_files() -> String {
    JETSONS
        .iter()
        .map(|n| {
            devices_dir()
                .join(format!("{n}.toml"))
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A temp dir with the tiny synthetic model.
fn tiny() -> (TempDir, String) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tiny.gguf");
    ok(&["synth", "--out", &s(&path), "--preset", "tiny"]);
    (dir, s(&path))
}

#[test]
fn plans_llama3_70b_on_the_five_jetsons() {
    let files = jetson_files();
    let o = ok(&[
        "plan",
        "--model-spec",
        "llama3-70b",
        "--devices",
        &files,
        "--link",
        "1gbit,2ms",
        "--pattern",
        "sporadic",
    ]);
    assert!(o.stdout.contains("predicted: TTFT"), "{}", o.stdout);
    for n in ["agx-orin-64gb", "agx-orin-32gb"] {
        assert!(o.stdout.contains(n), "{}", o.stdout);
    }
    for planner in ["loip", "ring", "contiguous"] {
        let v = ok_json(&[
            "plan",
            "--model-spec",
            "llama3-70b",
            "--devices",
            &files,
            "--link",
            "1gbit,2ms",
            "--pattern",
            "bursty:16",
            "--planner",
            planner,
            "--json",
        ]);
        assert_eq!(v["plan"]["planner"], planner);
        assert!(v["prediction"]["decode_tok_s"].as_f64().unwrap() > 0.0);
        assert_eq!(v["objective"], "Throughput");
    }
    let v = ok_json(&[
        "plan",
        "--model-spec",
        "llama3-70b",
        "--devices",
        &files,
        "--pattern",
        "bursty:16",
        "--objective",
        "latency",
        "--json",
    ]);
    assert_eq!(v["objective"], "Latency");
}

#[test]
fn plans_a_gguf_model_by_its_layers() {
    let model = common::smollm2();
    let nano = devices_dir().join("orin-nano-8gb.toml");
    let v = ok_json(&[
        "plan",
        "--model",
        &s(&model),
        "--devices",
        &s(&nano),
        "--json",
    ]);
    assert!(v["model"].as_str().unwrap().contains("SmolLM2"));
    // 30 decoder layers and the head, all placed, in order.
    let windows = v["plan"]["windows"].as_array().unwrap();
    let last = windows.last().unwrap()["units"]["end"].as_u64().unwrap();
    assert_eq!(last, 31);
}

#[test]
fn bad_device_files_name_the_file_and_the_field() {
    let tmp = TempDir::new().unwrap();
    let good = std::fs::read_to_string(devices_dir().join("orin-nano-8gb.toml")).unwrap();
    let cases = [
        (
            "missing.toml",
            good.replace("total_gib", "# total_gib"),
            "memory.total_gib",
        ),
        (
            "reserve.toml",
            good.replace("os_reserve_gib = ", "os_reserve_gib = 100 #"),
            "memory.os_reserve_gib",
        ),
        (
            "negative.toml",
            good.replace("read_gb_s = ", "read_gb_s = -1 #"),
            "storage.read_gb_s",
        ),
    ];
    for (name, text, field) in cases {
        assert_ne!(text, good, "{name}: the case must change the file");
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        fails(
            &["plan", "--model-spec", "llama3-70b", "--devices", &s(&path)],
            &[name, field],
        );
    }
    fails(
        &[
            "plan",
            "--model-spec",
            "llama3-70b",
            "--devices",
            &s(&tmp.path().join("absent.toml")),
        ],
        &["absent.toml"],
    );
    fails(
        &[
            "plan",
            "--model-spec",
            "llama3-70b",
            "--devices",
            &jetson_files(),
            "--link",
            "fast",
        ],
        &["link", "fast"],
    );
    fails(
        &[
            "plan",
            "--model-spec",
            "llama3-70b",
            "--devices",
            &jetson_files(),
            "--pattern",
            "bursty:0",
        ],
        &["pattern"],
    );
    fails(
        &[
            "plan",
            "--model-spec",
            "gpt-5",
            "--devices",
            &jetson_files(),
        ],
        &["gpt-5"],
    );
}

#[test]
fn a_model_no_plan_fits_states_the_shortfall_in_bytes() {
    let tmp = TempDir::new().unwrap();
    let small = tmp.path().join("small.toml");
    std::fs::write(
        &small,
        r#"
form = "spec"
name = "small"
[memory]
total_gib = 1.5
os_reserve_gib = 0.5
bandwidth_gb_s = 50
[compute.tflops]
default = 1.0
[storage]
read_gb_s = 1.0
"#,
    )
    .unwrap();
    let line = fails(
        &[
            "plan",
            "--model-spec",
            "llama3-70b",
            "--devices",
            &s(&small),
        ],
        &["no plan fits", "bytes"],
    );
    // The shortfall is a number of bytes.
    let n: String = line
        .split("is ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    assert!(n.parse::<u64>().unwrap() > 0, "{line}");
}

#[test]
fn self_needs_a_stored_profile_and_a_model_file() {
    let (dir, model) = tiny();
    let data = dir.path().join("data");
    fails(
        &[
            "plan",
            "--model",
            &model,
            "--devices",
            "self",
            "--data-dir",
            &s(&data),
        ],
        &["no stored profile", "loip profile"],
    );
    fails(
        &["plan", "--model-spec", "llama3-70b", "--devices", "self"],
        &["self", "--model"],
    );
}

#[test]
fn profile_is_stored_reused_and_used_by_plan() {
    let (dir, model) = tiny();
    let data = dir.path().join("data");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["profile", "--model", &model, "--quick", "--threads", "1"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        v.extend(["--data-dir".to_string(), s(&data)]);
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };
    let o = ok(&args(&[]));
    // Not a terminal: no progress bar, nothing on stderr.
    assert!(o.stderr.is_empty(), "{}", o.stderr);
    assert!(o.stdout.contains("new profile"), "{}", o.stdout);
    let v = ok_json(&args(&["--json"]));
    assert_eq!(v["reused"], true);
    let d = &v["stored"]["device"];
    assert!(d["storage"]["read_bytes_per_s"].as_f64().unwrap() > 0.0);
    assert!(d["memory_budget_bytes"].as_u64().unwrap() > 0);
    let toml = dir.path().join("self.toml");
    let v = ok_json(&args(&["--refresh", "--json", "--write-toml", &s(&toml)]));
    assert_eq!(v["reused"], false);
    assert_eq!(v["reason"], "--refresh");
    let parsed = loip::plan::DeviceProfile::from_toml_file(&toml).unwrap();
    parsed.validate().unwrap();
    // A different thread count measures again.
    let mut other = args(&["--json"]);
    other[5] = "2".into();
    assert_eq!(ok_json(&other)["reused"], false);

    let nano = devices_dir().join("orin-nano-8gb.toml");
    let devices = format!("self,{}", nano.display());
    let v = ok_json(&[
        "plan",
        "--model",
        &model,
        "--devices",
        &devices,
        "--data-dir",
        &s(&data),
        "--json",
    ]);
    assert!(v["prediction"]["tpot_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_corrupt_database_is_set_aside_with_a_warning() {
    let (dir, model) = tiny();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("db"), b"this is not a sled database").unwrap();
    std::fs::write(data.join("conf"), b"\x00\x01garbage").unwrap();
    let o = ok(&[
        "profile",
        "--model",
        &model,
        "--quick",
        "--threads",
        "1",
        "--data-dir",
        &s(&data),
    ]);
    assert!(
        o.stdout.contains("warning: the database was unusable"),
        "{}",
        o.stdout
    );
    assert!(
        o.stderr.contains("unusable"),
        "the log warns too: {}",
        o.stderr
    );
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("data.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // The rebuilt database holds the new profile.
    let v = ok_json(&[
        "profile",
        "--model",
        &model,
        "--quick",
        "--threads",
        "1",
        "--data-dir",
        &s(&data),
        "--json",
    ]);
    assert_eq!(v["reused"], true);
}

#[test]
fn validate_and_profile_refuse_a_missing_model_in_one_line() {
    let tmp = TempDir::new().unwrap();
    let missing = s(&tmp.path().join("missing.gguf"));
    fails(&["validate", "--model", &missing], &["missing.gguf"]);
    fails(
        &[
            "profile",
            "--model",
            &missing,
            "--data-dir",
            &s(&tmp.path().join("d")),
        ],
        &["missing.gguf"],
    );
}
