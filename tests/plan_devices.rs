//! Device files: the shipped ones parse; bad ones fail with an error that
//! names the file and the field.

use std::path::{Path, PathBuf};

use loip::plan::{DeviceProfile, PlanError};

fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/devices")
}

#[test]
fn shipped_device_files_parse() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(assets()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let d = DeviceProfile::from_toml_file(&path).unwrap_or_else(|e| panic!("{e}"));
            d.validate().unwrap();
            names.push(d.name);
        }
    }
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(n, names.len(), "device names must be unique");
    for jetson in [
        "agx-orin-64gb",
        "agx-orin-32gb",
        "orin-nx-16gb",
        "orin-nano-8gb",
        "xavier-nx-8gb",
    ] {
        assert!(names.iter().any(|x| x == jetson), "{jetson} missing");
    }
    let agx = DeviceProfile::from_toml_file(assets().join("agx-orin-64gb.toml")).unwrap();
    assert_eq!(agx.memory_budget_bytes, 62 << 30);
    assert_eq!(agx.storage.read_bytes_per_s, 3.95e9);
    // m = 1 / (0.8 × 204.8 GB/s).
    let m = agx.compute.weights["default"].s_per_byte;
    assert!((m * 0.8 * 204.8e9 - 1.0).abs() < 1e-12);
}

#[test]
fn profiled_form_round_trips() {
    let d = DeviceProfile::from_toml_file(assets().join("example-profiled.toml")).unwrap();
    let back = DeviceProfile::from_toml_str(&d.to_toml(), Path::new("x.toml")).unwrap();
    assert_eq!(d, back);
    let spec = DeviceProfile::from_toml_file(assets().join("orin-nano-8gb.toml")).unwrap();
    assert_eq!(
        spec,
        DeviceProfile::from_toml_str(&spec.to_toml(), Path::new("y.toml")).unwrap()
    );
}

const SPEC: &str = r#"
form = "spec"
name = "good"
[memory]
total_gib = 8
os_reserve_gib = 2
bandwidth_gb_s = 68.0
[compute]
tflops = { default = 1.28 }
[storage]
read_gb_s = 1.36
"#;

/// Replaces `from` in the good spec with `to` and parses it.
fn with(from: &str, to: &str) -> PlanError {
    assert!(SPEC.contains(from), "{from}");
    DeviceProfile::from_toml_str(&SPEC.replacen(from, to, 1), Path::new("devices/bad.toml"))
        .unwrap_err()
}

fn assert_names(e: &PlanError, field: &str) {
    let msg = e.to_string();
    assert!(msg.contains("devices/bad.toml"), "{msg}");
    assert!(
        msg.contains(&format!("`{field}`")),
        "{msg} should name {field}"
    );
    assert!(
        matches!(e, PlanError::DeviceField { field: f, .. } if f == field),
        "{e:?}"
    );
}

#[test]
fn bad_spec_files_name_file_and_field() {
    DeviceProfile::from_toml_str(SPEC, Path::new("good.toml")).unwrap();
    let cases = [
        ("read_gb_s = 1.36", "read_gb_s = 0", "storage.read_gb_s"),
        ("read_gb_s = 1.36", "read_gb_s = -1.0", "storage.read_gb_s"),
        ("read_gb_s = 1.36", "", "storage.read_gb_s"),
        ("total_gib = 8", "total_gib = -8", "memory.total_gib"),
        ("total_gib = 8", "total_gib = 0", "memory.total_gib"),
        ("total_gib = 8", "total_gib = \"8 GB\"", "memory.total_gib"),
        ("total_gib = 8", "total_gib = nan", "memory.total_gib"),
        (
            "os_reserve_gib = 2",
            "os_reserve_gib = 9",
            "memory.os_reserve_gib",
        ),
        (
            "bandwidth_gb_s = 68.0",
            "bandwidth_gb_s = 0.0",
            "memory.bandwidth_gb_s",
        ),
        (
            "bandwidth_gb_s = 68.0",
            "bandwdith_gb_s = 68.0",
            "memory.bandwdith_gb_s",
        ),
        ("default = 1.28", "default = 0", "compute.tflops.default"),
        ("default = 1.28", "bf17 = 1.28", "compute.tflops.bf17"),
        (
            "tflops = { default = 1.28 }",
            "tflops = {}",
            "compute.tflops",
        ),
        (
            "tflops = { default = 1.28 }",
            "tflops = { default = 1.28 }\nefficiency = 1.5",
            "compute.efficiency",
        ),
        ("name = \"good\"", "name = \"\"", "name"),
        ("form = \"spec\"", "form = \"guess\"", "form"),
        ("[storage]\nread_gb_s = 1.36", "", "storage"),
    ];
    for (from, to, field) in cases {
        let e = with(from, to);
        assert_names(&e, field);
    }
}

#[test]
fn bad_profiled_files_name_file_and_field() {
    let text = std::fs::read_to_string(assets().join("example-profiled.toml")).unwrap();
    let cases = [
        (
            "budget_bytes = 66571993088",
            "budget_bytes = -1",
            "memory.budget_bytes",
        ),
        (
            "budget_bytes = 66571993088",
            "budget_bytes = 6.5e10",
            "memory.budget_bytes",
        ),
        (
            "read_bytes_per_s = 3.95e9",
            "read_bytes_per_s = 0.0",
            "storage.read_bytes_per_s",
        ),
        (
            "kv_s_per_byte = 6.1e-12",
            "kv_s_per_byte = -6.1e-12",
            "compute.kv_s_per_byte",
        ),
        (
            "[compute.weights.BF16]\ns_per_byte = 6.1e-12",
            "[compute.weights.BF16]\ns_per_byte = 0",
            "compute.weights.BF16.s_per_byte",
        ),
        (
            "[compute.weights.F32]",
            "[compute.weights.F33]",
            "compute.weights.F33",
        ),
    ];
    for (from, to, field) in cases {
        assert!(text.contains(from), "{from}");
        let e = DeviceProfile::from_toml_str(
            &text.replacen(from, to, 1),
            Path::new("devices/bad.toml"),
        )
        .unwrap_err();
        assert_names(&e, field);
    }
}

#[test]
fn unreadable_and_malformed_files_name_the_file() {
    let e = DeviceProfile::from_toml_file("/nonexistent/dev.toml").unwrap_err();
    assert!(
        matches!(e, PlanError::Io { .. }) && e.to_string().contains("/nonexistent/dev.toml"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("loip-plan-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    std::fs::write(&path, "form = \"spec\"\n[memory\n").unwrap();
    let e = DeviceProfile::from_toml_file(&path).unwrap_err();
    assert!(
        matches!(e, PlanError::Toml { .. }) && e.to_string().contains("broken.toml"),
        "{e}"
    );
    std::fs::write(&path, SPEC.replace("read_gb_s = 1.36", "read_gb_s = 0")).unwrap();
    let e = DeviceProfile::from_toml_file(&path).unwrap_err();
    assert!(
        e.to_string().contains("broken.toml") && e.to_string().contains("storage.read_gb_s"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
