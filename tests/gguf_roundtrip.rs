//! Writer → reader round trips, and the real SmolLM2 file when present.

use std::collections::BTreeMap;
use std::path::PathBuf;

use loip::model::dtype::GgmlType;
use loip::model::gguf::{Array, Gguf, GgufError, GgufWriter, OptionalKey, Value};

/// Deterministic filler bytes (xorshift), so failures reproduce.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gguf_roundtrip_{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// One key per scalar type, one per array element type, and nested arrays.
fn all_values() -> Vec<(&'static str, Value)> {
    vec![
        ("t.u8", Value::U8(200)),
        ("t.i8", Value::I8(-100)),
        ("t.u16", Value::U16(60000)),
        ("t.i16", Value::I16(-30000)),
        ("t.u32", Value::U32(4_000_000_000)),
        ("t.i32", Value::I32(-2_000_000_000)),
        ("t.u64", Value::U64(u64::MAX)),
        ("t.i64", Value::I64(i64::MIN)),
        ("t.f32", Value::F32(-1.5e-7)),
        ("t.f64", Value::F64(std::f64::consts::PI)),
        ("t.bool.true", Value::Bool(true)),
        ("t.bool.false", Value::Bool(false)),
        ("t.string", Value::String("héllo, 世界".into())),
        ("t.string.empty", Value::String(String::new())),
        ("a.u8", Value::Array(Array::U8(vec![0, 1, 255]))),
        ("a.i8", Value::Array(Array::I8(vec![-128, 0, 127]))),
        ("a.u16", Value::Array(Array::U16(vec![0, 65535]))),
        ("a.i16", Value::Array(Array::I16(vec![-32768, 32767]))),
        ("a.u32", Value::Array(Array::U32(vec![1, 2, u32::MAX]))),
        ("a.i32", Value::Array(Array::I32(vec![-1, 0, i32::MAX]))),
        ("a.u64", Value::Array(Array::U64(vec![u64::MAX, 7]))),
        ("a.i64", Value::Array(Array::I64(vec![i64::MIN, 7]))),
        (
            "a.f32",
            Value::Array(Array::F32(vec![0.0, -0.0, 1e30, f32::MIN_POSITIVE])),
        ),
        ("a.f64", Value::Array(Array::F64(vec![1e300, -2.5]))),
        ("a.bool", Value::Array(Array::Bool(vec![true, false, true]))),
        (
            "a.string",
            Value::Array(Array::String(vec!["a".into(), String::new(), "ü".into()])),
        ),
        ("a.empty", Value::Array(Array::U32(vec![]))),
        (
            "a.nested",
            Value::Array(Array::Array(vec![
                Array::I32(vec![1, 2]),
                Array::String(vec!["x".into()]),
                Array::Array(vec![Array::F64(vec![0.5]), Array::Bool(vec![])]),
                Array::Array(vec![]),
            ])),
        ),
    ]
}

/// (name, dims, type) covering float, legacy and k-quant block formats.
fn tensor_specs() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("f32.vec", vec![7], GgmlType::F32),
        ("f16.mat", vec![5, 3], GgmlType::F16),
        ("bf16.mat", vec![4, 2, 3], GgmlType::BF16),
        ("q4_1.mat", vec![64, 3], GgmlType::Q4_1),
        ("q8_0.mat", vec![32, 2, 2, 2], GgmlType::Q8_0),
        ("q4_k.mat", vec![256, 2], GgmlType::Q4_K),
        ("q6_k.vec", vec![512], GgmlType::Q6_K),
    ]
}

fn tensor_bytes(dims: &[u64], ty: GgmlType, seed: u64) -> Vec<u8> {
    let rows: u64 = dims[1..].iter().product();
    let len = ty.row_bytes(dims[0]).unwrap() * rows;
    bytes(len as usize, seed)
}

fn build(version: u32, alignment: Option<u32>) -> GgufWriter {
    let mut w = GgufWriter::with_version(version);
    if let Some(a) = alignment {
        w.add_kv("general.alignment", Value::U32(a));
    }
    for (k, v) in all_values() {
        w.add_kv(k, v);
    }
    for (i, (name, dims, ty)) in tensor_specs().into_iter().enumerate() {
        w.add_tensor(name, &dims, ty, tensor_bytes(&dims, ty, i as u64));
    }
    w
}

fn check(g: &Gguf, version: u32, alignment: u64) {
    assert_eq!(g.version(), version);
    assert_eq!(g.alignment(), alignment);
    assert_eq!(g.data_offset() % alignment, 0, "data section aligned");

    // Every value back, in the order written.
    let extra = usize::from(alignment != 32);
    let expected = all_values();
    assert_eq!(g.metadata().len(), expected.len() + extra);
    let got: Vec<(&str, &Value)> = g.metadata().iter().skip(extra).collect();
    for ((k, v), (gk, gv)) in expected.iter().zip(&got) {
        assert_eq!(k, gk, "key order");
        assert_eq!(v, *gv, "value of {k}");
        assert_eq!(g.metadata().get(k), Some(v), "index lookup of {k}");
    }

    assert_eq!(g.tensors().len(), tensor_specs().len());
    for (i, (name, dims, ty)) in tensor_specs().into_iter().enumerate() {
        let t = g
            .tensor(name)
            .unwrap_or_else(|| panic!("tensor {name} missing"));
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(t.ty, ty, "{name}");
        assert_eq!(t.offset % alignment, 0, "{name} aligned");
        assert_eq!(t.n_elements(), dims.iter().product::<u64>());
        assert_eq!(t.n_rows() * t.row_bytes(), t.size, "{name}");
        assert_eq!(
            g.tensor_data(t),
            tensor_bytes(&dims, ty, i as u64),
            "{name} data"
        );
        // A copy of the info resolves to the same bytes.
        assert_eq!(
            g.tensor_data(&t.clone()).as_ptr(),
            g.tensor_data(t).as_ptr()
        );
    }
    assert!(g.tensor("absent").is_none());
}

#[test]
fn every_value_type_and_tensor_type_round_trip_v3() {
    let g = Gguf::from_bytes(build(3, None).to_bytes().unwrap()).unwrap();
    check(&g, 3, 32);
}

#[test]
fn version_2_round_trips() {
    let g = Gguf::from_bytes(build(2, None).to_bytes().unwrap()).unwrap();
    check(&g, 2, 32);
}

#[test]
fn alignment_key_is_honoured() {
    for a in [1u32, 8, 64, 4096] {
        let bytes = build(3, Some(a)).to_bytes().unwrap();
        let g = Gguf::from_bytes(bytes).unwrap();
        check(&g, 3, u64::from(a));
    }
}

#[test]
fn layout_is_the_running_padded_sum() {
    let g = Gguf::from_bytes(build(3, Some(64)).to_bytes().unwrap()).unwrap();
    let mut expected = 0;
    for t in g.tensors() {
        assert_eq!(t.offset, expected, "{}", t.name);
        expected = (t.offset + t.size).div_ceil(64) * 64;
    }
    // The writer pads the last tensor too, as llama.cpp does.
    assert_eq!(g.file_len(), g.data_offset() + expected);
}

#[test]
fn rewriting_a_parsed_file_gives_the_same_bytes() {
    let first = build(3, Some(16)).to_bytes().unwrap();
    let g = Gguf::from_bytes(first.clone()).unwrap();
    assert_eq!(rewrite(&g).to_bytes().unwrap(), first);
}

/// A writer holding everything `g` holds, in the same order.
fn rewrite(g: &Gguf) -> GgufWriter {
    let mut w = GgufWriter::with_version(g.version());
    for (k, v) in g.metadata().iter() {
        w.add_kv(k, v.clone());
    }
    for t in g.tensors() {
        w.add_tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
    }
    w
}

#[test]
fn write_then_open_via_mmap() {
    let dir = scratch_dir("write_open");
    let path = dir.join("model.gguf");
    let w = build(3, None);
    w.write(&path).unwrap();
    let g = Gguf::open(&path).unwrap();
    check(&g, 3, 32);
    assert_eq!(g.path(), Some(path.as_path()));
    let stamp = g.file_stamp().expect("opened from a file");
    assert_eq!(stamp.len, std::fs::metadata(&path).unwrap().len());
    assert_eq!(stamp, &loip::model::gguf::FileStamp::of(&path).unwrap());
    assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes().unwrap());
    // Only the model: the temporary file was renamed, not left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("model.gguf")]);

    // Overwriting replaces the file whole.
    GgufWriter::new()
        .add_kv("only", Value::Bool(true))
        .write(&path)
        .unwrap();
    let g2 = Gguf::open(&path).unwrap();
    assert_eq!(g2.metadata().len(), 1);
    assert!(g2.tensors().is_empty());
}

#[test]
fn from_bytes_has_no_file_stamp() {
    let g = Gguf::from_bytes(GgufWriter::new().to_bytes().unwrap()).unwrap();
    assert!(g.file_stamp().is_none() && g.path().is_none());
    assert_eq!(g.data_offset(), 32);
    assert_eq!(g.file_len(), 32);
}

#[test]
fn streamed_tensor_data_is_written_without_a_buffer() {
    let dir = scratch_dir("streamed");
    let path = dir.join("big.gguf");
    let (ne0, rows) = (4096u64, 256u64); // 4 MiB of F32, produced row by row
    let mut w = GgufWriter::new();
    w.add_tensor_with("big", &[ne0, rows], GgmlType::F32, move |out| {
        for r in 0..rows {
            let row: Vec<u8> = (0..ne0)
                .flat_map(|i| ((r * ne0 + i) as f32).to_le_bytes())
                .collect();
            out.write_all(&row)?;
        }
        Ok(())
    });
    w.add_tensor("small", &[32], GgmlType::Q8_0, bytes(34, 1));
    w.write(&path).unwrap();
    let g = Gguf::open(&path).unwrap();
    let data = g.tensor_data(g.tensor("big").unwrap());
    assert_eq!(data.len() as u64, ne0 * rows * 4);
    let last = f32::from_le_bytes(data[data.len() - 4..].try_into().unwrap());
    assert_eq!(last, (ne0 * rows - 1) as f32);
    assert_eq!(g.tensor_data(g.tensor("small").unwrap()), bytes(34, 1));
    assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes().unwrap());
}

#[test]
fn streamed_tensor_of_the_wrong_size_is_an_error() {
    for written in [31usize, 33, 1000] {
        let mut w = GgufWriter::new();
        w.add_tensor_with("short", &[8], GgmlType::F32, move |out| {
            out.write_all(&vec![0u8; written])
        });
        match w.to_bytes() {
            Err(GgufError::TensorDataSize {
                name,
                expected: 32,
                found,
                ..
            }) => {
                assert_eq!(name, "short");
                assert_eq!(found, written as u64);
            }
            other => panic!("wrote {written} of 32 bytes: {other:?}"),
        }
    }
}

#[test]
fn streamed_tensor_source_failure_names_the_tensor() {
    let dir = scratch_dir("source_failure");
    let path = dir.join("m.gguf");
    let mut w = GgufWriter::new();
    w.add_tensor_with("broken", &[8], GgmlType::F32, |_| {
        Err(std::io::Error::other("disk gone"))
    });
    match w.write(&path) {
        Err(GgufError::TensorSource { name, source }) => {
            assert_eq!(name, "broken");
            assert_eq!(source.to_string(), "disk gone");
        }
        other => panic!("{other:?}"),
    }
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "temp file removed"
    );
}

#[test]
fn writer_rejects_what_the_reader_would() {
    let err = |w: &mut GgufWriter| w.to_bytes().expect_err("writer must refuse");

    let e = err(GgufWriter::new().add_tensor("w", &[64], GgmlType::Q4_1, vec![0; 39]));
    assert!(
        matches!(&e, GgufError::TensorDataSize { name, expected: 40, found: 39, .. } if name == "w"),
        "{e}"
    );

    let e = err(GgufWriter::new()
        .add_kv("k", Value::U8(1))
        .add_kv("k", Value::U8(2)));
    assert!(
        matches!(&e, GgufError::DuplicateKey { key } if key == "k"),
        "{e}"
    );

    let e = err(GgufWriter::new()
        .add_tensor("t", &[1], GgmlType::F32, vec![0; 4])
        .add_tensor("t", &[1], GgmlType::F32, vec![0; 4]));
    assert!(
        matches!(&e, GgufError::DuplicateTensor { name } if name == "t"),
        "{e}"
    );

    let e = err(&mut GgufWriter::with_version(1));
    assert!(
        matches!(e, GgufError::UnsupportedVersion { version: 1 }),
        "{e}"
    );

    let e = err(GgufWriter::new().add_kv("general.alignment", Value::U64(32)));
    assert!(matches!(e, GgufError::BadAlignment { .. }), "{e}");

    let e = err(GgufWriter::new().add_tensor("q", &[33], GgmlType::Q8_0, vec![]));
    assert!(
        matches!(&e, GgufError::RowNotBlockMultiple { name, ne0: 33, .. } if name == "q"),
        "{e}"
    );

    let mut deep = Array::U8(vec![1]);
    for _ in 0..8 {
        deep = Array::Array(vec![deep]);
    }
    let e = err(GgufWriter::new().add_kv("deep", Value::Array(deep)));
    assert!(
        matches!(&e, GgufError::ArrayTooDeep { key, .. } if key == "deep"),
        "{e}"
    );
}

#[test]
fn typed_getters_convert_and_name_the_key() {
    let mut w = GgufWriter::new();
    w.add_kv("small", Value::U8(7))
        .add_kv("neg", Value::I64(-1))
        .add_kv("wide", Value::U64(1 << 40))
        .add_kv("f64", Value::F64(0.25))
        .add_kv("name", Value::String("llama".into()))
        .add_kv("flag", Value::Bool(true))
        .add_kv("ids", Value::Array(Array::I32(vec![1, 2])))
        .add_kv("scores", Value::Array(Array::F32(vec![0.5])))
        .add_kv("tokens", Value::Array(Array::String(vec!["a".into()])));
    let g = Gguf::from_bytes(w.to_bytes().unwrap()).unwrap();
    let m = g.metadata();
    assert_eq!(m.get_u32("small").unwrap(), 7);
    assert_eq!(m.get_u64("wide").unwrap(), 1 << 40);
    assert_eq!(m.get_f32("f64").unwrap(), 0.25);
    assert_eq!(m.get_str("name").unwrap(), "llama");
    assert!(m.get_bool("flag").unwrap());
    assert_eq!(m.get_i32_array("ids").unwrap(), &[1, 2]);
    assert_eq!(m.get_f32_array("scores").unwrap(), &[0.5]);
    assert_eq!(m.get_str_array("tokens").unwrap(), &["a".to_string()]);

    let e = m.get_u32("wide").unwrap_err();
    assert!(
        matches!(&e, GgufError::OutOfRange { key, target: "u32", .. } if key == "wide"),
        "{e}"
    );
    let e = m.get_u64("neg").unwrap_err();
    assert!(
        matches!(&e, GgufError::OutOfRange { key, value: -1, .. } if key == "neg"),
        "{e}"
    );
    let e = m.get_u32("name").unwrap_err();
    assert!(
        e.to_string().contains("\"name\"") && e.to_string().contains("found string"),
        "{e}"
    );
    let e = m.get_str_array("ids").unwrap_err();
    assert!(
        matches!(&e, GgufError::WrongType { key, expected: "array of string", found: "array of i32" } if key == "ids"),
        "{e}"
    );
    let e = m.get_f32("small").unwrap_err();
    assert!(
        matches!(&e, GgufError::WrongType { key, found: "u8", .. } if key == "small"),
        "{e}"
    );

    let e = m.get_u32("absent").unwrap_err();
    assert!(
        matches!(&e, GgufError::MissingKey { key } if key == "absent"),
        "{e}"
    );
    assert_eq!(m.get_u32("absent").optional().unwrap(), None);
    assert_eq!(m.get_u32("small").optional().unwrap(), Some(7));
    assert!(
        m.get_u32("name").optional().is_err(),
        "a wrong type is not 'absent'"
    );
}

fn models_dir() -> PathBuf {
    std::env::var_os("LOIP_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"))
}

#[test]
fn real_smollm2_file() {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        println!(
            "skipped: {} not found (set LOIP_MODELS_DIR)",
            path.display()
        );
        return;
    }
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.tensors().len(), 272);
    let mut by_type = BTreeMap::new();
    for t in g.tensors() {
        *by_type.entry(t.ty.name()).or_insert(0) += 1;
    }
    assert_eq!(
        by_type,
        BTreeMap::from([("F32", 61), ("Q4_1", 210), ("Q8_0", 1)])
    );
    let m = g.metadata();
    assert_eq!(m.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(m.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(
        m.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(
        (embd.ty, embd.dims.as_slice()),
        (GgmlType::Q8_0, &[576u64, 49152][..])
    );
    assert_eq!(g.tensor_data(embd).len() as u64, embd.size);

    // Our writer lays the file out exactly as llama.cpp did.
    let ours = rewrite(&g).to_bytes().unwrap();
    let original = std::fs::read(&path).unwrap();
    assert_eq!(ours.len(), original.len());
    assert!(ours == original, "rewritten file differs from the original");
}
