//! Hostile GGUF files, built byte by byte: one test per row of
//! RELIABILITY.md's "GGUF files" table, and more. Each asserts the specific
//! error and that it names the offending key or tensor.

use std::time::{Duration, Instant};

use loip::model::dtype::GgmlType;
use loip::model::gguf::{Array, Gguf, GgufError, GgufWriter, Value};

// Value type ids.
const U8: u32 = 0;
const U32: u32 = 4;
const I32: u32 = 5;
const F32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U64: u32 = 10;
// ggml type ids.
const GGML_F32: u32 = 0;
const GGML_Q4_1: u32 = 3;
const GGML_Q8_0: u32 = 8;

/// Builds a file field by field.
#[derive(Clone, Default)]
struct B(Vec<u8>);

impl B {
    /// Magic, version, tensor count, key/value count.
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> B {
        B::default()
            .raw(b"GGUF")
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn raw(mut self, b: &[u8]) -> B {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, v: u8) -> B {
        self.raw(&[v])
    }
    fn u32(self, v: u32) -> B {
        self.raw(&v.to_le_bytes())
    }
    fn u64(self, v: u64) -> B {
        self.raw(&v.to_le_bytes())
    }
    fn str(self, s: &str) -> B {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A key and the value type id; the value follows.
    fn key(self, key: &str, ty: u32) -> B {
        self.str(key).u32(ty)
    }
    fn kv_u32(self, key: &str, v: u32) -> B {
        self.key(key, U32).u32(v)
    }
    /// Array header: element type and count; elements follow.
    fn array(self, elem: u32, count: u64) -> B {
        self.u32(elem).u64(count)
    }
    fn tensor(self, name: &str, dims: &[u64], ty: u32, offset: u64) -> B {
        let mut b = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            b = b.u64(d);
        }
        b.u32(ty).u64(offset)
    }
    /// Zero padding up to a multiple of `alignment`.
    fn pad(self, alignment: usize) -> B {
        let n = self.0.len().next_multiple_of(alignment) - self.0.len();
        self.zeros(n)
    }
    fn zeros(self, n: usize) -> B {
        self.raw(&vec![0; n])
    }
    fn parse(self) -> Result<Gguf, GgufError> {
        Gguf::from_bytes(self.0)
    }
    fn err(self) -> GgufError {
        match self.parse() {
            Ok(g) => panic!("accepted a malformed file: {g:?}"),
            Err(e) => e,
        }
    }
}

/// A valid file with one F32 tensor of `n` elements, for contrast.
fn one_f32_tensor(n: u64) -> B {
    B::header(3, 1, 0)
        .tensor("w", &[n], GGML_F32, 0)
        .pad(32)
        .zeros(n as usize * 4)
}

/// Runs `f` and checks it finished quickly: a file's counts must not make
/// the reader loop or allocate by them.
fn quick<T>(f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(500), "took {took:?}");
    out
}

fn assert_one_line(e: &GgufError) {
    let s = e.to_string();
    assert!(
        !s.is_empty() && !s.contains('\n') && !s.contains('\r'),
        "not one line: {s:?}"
    );
}

// --- sanity: the builder makes files the reader accepts ------------------

#[test]
fn builder_makes_valid_files() {
    let g = one_f32_tensor(8).parse().unwrap();
    assert_eq!(g.tensor("w").unwrap().size, 32);
    let g = B::header(2, 0, 1).kv_u32("k", 5).pad(32).parse().unwrap();
    assert_eq!(g.metadata().get_u32("k").unwrap(), 5);
}

// --- header ----------------------------------------------------------------

#[test]
fn bad_magic() {
    let e = B::default().raw(b"GGML").u32(3).u64(0).u64(0).err();
    assert!(
        matches!(e, GgufError::BadMagic { found } if &found == b"GGML"),
        "{e}"
    );
}

#[test]
fn unknown_versions() {
    // 1 used 32-bit counts; 0x0300_0000 is a big-endian version 3.
    for version in [0, 1, 4, 0x0300_0000] {
        let e = B::header(version, 0, 0).err();
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version: v } if v == version),
            "{e}"
        );
    }
}

#[test]
fn truncated_header() {
    let full = B::header(3, 0, 0).0;
    for len in 0..full.len() {
        let e = Gguf::from_bytes(full[..len].to_vec()).unwrap_err();
        assert!(
            matches!(e, GgufError::Truncated { .. }),
            "length {len}: {e}"
        );
    }
}

#[test]
fn huge_tensor_count_fails_before_allocating() {
    let e = quick(|| B::header(3, u64::MAX, 0).zeros(64).err());
    assert!(
        matches!(e, GgufError::CountTooLarge { count: u64::MAX, ref what, .. } if what.contains("tensor count")),
        "{e}"
    );
}

#[test]
fn huge_kv_count_fails_before_allocating() {
    let e = quick(|| B::header(3, 0, u64::MAX).zeros(64).err());
    assert!(
        matches!(e, GgufError::CountTooLarge { count: u64::MAX, ref what, .. } if what.contains("metadata count")),
        "{e}"
    );
    // A count only a little too large for the bytes left fails the same way.
    let e = quick(|| B::header(3, 0, 100).kv_u32("a", 1).err());
    assert!(
        matches!(e, GgufError::CountTooLarge { count: 100, .. }),
        "{e}"
    );
}

// --- strings and arrays ----------------------------------------------------

#[test]
fn key_length_u64_max() {
    let e = quick(|| B::header(3, 0, 1).u64(u64::MAX).zeros(16).err());
    assert!(
        matches!(e, GgufError::StringTooLong { len: u64::MAX, .. }),
        "{e}"
    );
}

#[test]
fn string_value_length_u64_max_names_the_key() {
    let e = quick(|| {
        B::header(3, 0, 1)
            .key("general.name", STRING)
            .u64(u64::MAX)
            .err()
    });
    assert!(
        matches!(&e, GgufError::StringTooLong { what, .. } if what.contains("\"general.name\"")),
        "{e}"
    );
}

#[test]
fn string_past_end_of_file() {
    let e = B::header(3, 0, 1)
        .key("general.name", STRING)
        .u64(100)
        .raw(b"short")
        .err();
    match &e {
        GgufError::Truncated {
            what,
            needed: 100,
            available: 5,
            ..
        } => {
            assert!(what.contains("\"general.name\""), "{e}")
        }
        _ => panic!("{e}"),
    }
}

#[test]
fn array_count_2_pow_30_without_payload_is_o1() {
    for elem in [U8, U32, U64, STRING, ARRAY, BOOL] {
        let e = quick(|| {
            B::header(3, 0, 1)
                .key("tokenizer.ggml.scores", ARRAY)
                .array(elem, 1 << 30)
                .err()
        });
        match &e {
            GgufError::CountTooLarge { count, what, .. } => {
                assert_eq!(*count, 1 << 30);
                assert!(what.contains("tokenizer.ggml.scores"), "{e}");
            }
            _ => panic!("element type {elem}: {e}"),
        }
    }
}

#[test]
fn array_payload_shorter_than_its_count() {
    // 3 u32s declared, 2 present: the count is refused before reading.
    let e = B::header(3, 0, 1)
        .key("a", ARRAY)
        .array(U32, 3)
        .u32(1)
        .u32(2)
        .err();
    assert!(
        matches!(&e, GgufError::CountTooLarge { count: 3, available: 8, what, .. } if what.contains("\"a\"")),
        "{e}"
    );
    // Strings: the count fits (8 bytes each at least) but the last is cut.
    let e = B::header(3, 0, 1)
        .key("s", ARRAY)
        .array(STRING, 2)
        .str("ok")
        .u64(4)
        .raw(b"ab")
        .err();
    assert!(
        matches!(&e, GgufError::Truncated { what, .. } if what.contains("\"s\"")),
        "{e}"
    );
}

#[test]
fn nested_arrays_are_capped_at_depth_8() {
    let nested = |depth: usize| {
        let mut b = B::header(3, 0, 1).key("deep", ARRAY);
        for _ in 1..depth {
            b = b.array(ARRAY, 1);
        }
        b.array(U8, 1).u8(7).pad(32)
    };
    nested(8).parse().expect("depth 8 is allowed");
    let e = nested(9).err();
    assert!(
        matches!(&e, GgufError::ArrayTooDeep { key, max: 8 } if key == "deep"),
        "{e}"
    );
    // Very deep nesting ends at the cap, not in a stack overflow.
    let e = quick(|| nested(100_000).err());
    assert!(matches!(e, GgufError::ArrayTooDeep { .. }), "{e}");
}

#[test]
fn unknown_value_type() {
    let e = B::header(3, 0, 1).key("odd", 13).u32(0).err();
    assert!(
        matches!(&e, GgufError::UnknownValueType { key, id: 13 } if key == "odd"),
        "{e}"
    );
    let e = B::header(3, 0, 1)
        .key("odd.array", ARRAY)
        .array(u32::MAX, 0)
        .err();
    assert!(
        matches!(&e, GgufError::UnknownValueType { key, id: u32::MAX } if key == "odd.array"),
        "{e}"
    );
}

#[test]
fn bool_other_than_0_or_1() {
    let e = B::header(3, 0, 1).key("flag", BOOL).u8(2).err();
    assert!(
        matches!(&e, GgufError::InvalidBool { key, byte: 2 } if key == "flag"),
        "{e}"
    );
    let e = B::header(3, 0, 1)
        .key("flags", ARRAY)
        .array(BOOL, 2)
        .u8(1)
        .u8(255)
        .err();
    assert!(
        matches!(&e, GgufError::InvalidBool { key, byte: 255 } if key == "flags"),
        "{e}"
    );
}

#[test]
fn invalid_utf8_is_an_error_not_a_panic() {
    let e = B::header(3, 0, 1)
        .u64(2)
        .raw(&[0xC3, 0x28])
        .u32(U8)
        .u8(0)
        .err();
    assert!(
        matches!(&e, GgufError::InvalidUtf8 { what, .. } if what.contains("key of metadata entry #0")),
        "{e}"
    );
    let e = B::header(3, 0, 1)
        .key("general.name", STRING)
        .u64(1)
        .raw(&[0xFF])
        .err();
    assert!(
        matches!(&e, GgufError::InvalidUtf8 { what, .. } if what.contains("general.name")),
        "{e}"
    );
    let e = B::header(3, 1, 0).u64(1).raw(&[0x80]).zeros(64).err();
    assert!(
        matches!(&e, GgufError::InvalidUtf8 { what, .. } if what.contains("tensor info #0")),
        "{e}"
    );
}

#[test]
fn duplicate_key() {
    let e = B::header(3, 0, 2)
        .kv_u32("llama.block_count", 30)
        .kv_u32("llama.block_count", 31)
        .err();
    assert!(
        matches!(&e, GgufError::DuplicateKey { key } if key == "llama.block_count"),
        "{e}"
    );
}

// --- tokenizer arrays ------------------------------------------------------

#[test]
fn tokenizer_array_of_the_wrong_element_type() {
    let g = B::header(3, 0, 2)
        .key("tokenizer.ggml.tokens", ARRAY)
        .array(I32, 2)
        .u32(1)
        .u32(2)
        .key("tokenizer.ggml.token_type", ARRAY)
        .array(STRING, 1)
        .str("1")
        .pad(32)
        .parse()
        .unwrap();
    let m = g.metadata();
    let e = m.get_str_array("tokenizer.ggml.tokens").unwrap_err();
    assert!(
        matches!(&e, GgufError::WrongType { key, expected: "array of string", found: "array of i32" } if key == "tokenizer.ggml.tokens"),
        "{e}"
    );
    let e = m.get_i32_array("tokenizer.ggml.token_type").unwrap_err();
    assert!(
        matches!(&e, GgufError::WrongType { key, .. } if key == "tokenizer.ggml.token_type"),
        "{e}"
    );
    let e = m.get_f32_array("tokenizer.ggml.tokens").unwrap_err();
    assert!(
        matches!(
            &e,
            GgufError::WrongType {
                expected: "array of f32",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn token_longer_than_i32_max() {
    let len = i32::MAX as u64 + 1;
    let e = quick(|| {
        B::header(3, 0, 1)
            .key("tokenizer.ggml.tokens", ARRAY)
            .array(STRING, 1)
            .u64(len)
            .err()
    });
    assert!(
        matches!(&e, GgufError::StringTooLong { what, len: l, .. } if *l == len && what.contains("tokenizer.ggml.tokens")),
        "{e}"
    );
}

// --- alignment -------------------------------------------------------------

#[test]
fn alignment_zero_13_and_2_pow_31() {
    for a in [0u32, 13, 1 << 31, 3, u32::MAX] {
        let e = B::header(3, 0, 1)
            .kv_u32("general.alignment", a)
            .zeros(64)
            .err();
        assert!(
            matches!(&e, GgufError::BadAlignment { reason } if reason.contains(&a.to_string())),
            "{a}: {e}"
        );
        assert!(e.to_string().contains("general.alignment"), "{e}");
    }
}

#[test]
fn alignment_of_a_non_u32_type() {
    let files = [
        B::header(3, 0, 1).key("general.alignment", U64).u64(32),
        B::header(3, 0, 1).key("general.alignment", I32).u32(32),
        B::header(3, 0, 1)
            .key("general.alignment", F32)
            .raw(&32f32.to_le_bytes()),
        B::header(3, 0, 1)
            .key("general.alignment", STRING)
            .str("32"),
    ];
    for b in files {
        let e = b.zeros(64).err();
        assert!(
            matches!(&e, GgufError::BadAlignment { reason } if reason.contains("expected u32")),
            "{e}"
        );
    }
}

// --- tensor shapes and types -----------------------------------------------

#[test]
fn too_many_or_no_dims() {
    let e = B::header(3, 1, 0)
        .tensor("t5", &[1, 1, 1, 1, 1], GGML_F32, 0)
        .pad(32)
        .zeros(32)
        .err();
    assert!(
        matches!(&e, GgufError::BadDimCount { name, n_dims: 5, .. } if name == "t5"),
        "{e}"
    );
    let e = B::header(3, 1, 0)
        .tensor("t0", &[], GGML_F32, 0)
        .pad(32)
        .zeros(32)
        .err();
    assert!(
        matches!(&e, GgufError::BadDimCount { name, n_dims: 0, .. } if name == "t0"),
        "{e}"
    );
    // n_dims is checked before the dims are read.
    let e = quick(|| B::header(3, 1, 0).str("tmax").u32(u32::MAX).zeros(64).err());
    assert!(
        matches!(&e, GgufError::BadDimCount { name, .. } if name == "tmax"),
        "{e}"
    );
}

#[test]
fn zero_or_negative_dim() {
    let e = B::header(3, 1, 0)
        .tensor("z", &[4, 0], GGML_F32, 0)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::BadDim { name, index: 1, value: 0 } if name == "z"),
        "{e}"
    );
    let neg = (-4i64) as u64;
    let e = B::header(3, 1, 0)
        .tensor("n", &[neg], GGML_F32, 0)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::BadDim { name, index: 0, value } if name == "n" && *value == neg),
        "{e}"
    );
}

#[test]
fn dims_overflowing() {
    let cases: [&[u64]; 3] = [
        &[i64::MAX as u64, 2],                 // INT64_MAX × 2
        &[1 << 32, 1 << 31],                   // exactly 2^63
        &[1 << 16, 1 << 16, 1 << 16, 1 << 16], // 2^64 wraps to 0
    ];
    for dims in cases {
        let e = B::header(3, 1, 0)
            .tensor("big", dims, GGML_F32, 0)
            .pad(32)
            .zeros(64)
            .err();
        assert!(
            matches!(&e, GgufError::ShapeOverflow { name, .. } if name == "big"),
            "{dims:?}: {e}"
        );
    }
}

#[test]
fn quantized_byte_size_wraps() {
    // 2^62 F32 elements are fine as a count, but 2^64 bytes wrap a u64.
    let e = B::header(3, 1, 0)
        .tensor("f", &[1 << 62], GGML_F32, 0)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::SizeOverflow { name, .. } if name == "f"),
        "{e}"
    );
    // 2^58 - 1 Q8_0 blocks of 34 bytes: past i64::MAX (ggml's size_t
    // arithmetic on 32-bit targets and its int64 offsets).
    let ne0 = (1u64 << 63) - 32;
    let e = B::header(3, 1, 0)
        .tensor("q", &[ne0], GGML_Q8_0, 0)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::SizeOverflow { name, .. } if name == "q"),
        "{e}"
    );
}

#[test]
fn row_not_a_multiple_of_the_block_size() {
    let e = B::header(3, 1, 0)
        .tensor("blk.0.attn_q.weight", &[33, 4], GGML_Q4_1, 0)
        .pad(32)
        .zeros(256)
        .err();
    assert!(
        matches!(&e, GgufError::RowNotBlockMultiple { name, ne0: 33, block: 32, .. } if name == "blk.0.attn_q.weight"),
        "{e}"
    );
}

#[test]
fn tensor_type_id_out_of_range() {
    for id in [4u32, 5, 39, u32::MAX] {
        let e = B::header(3, 1, 0)
            .tensor("t", &[32], id, 0)
            .pad(32)
            .zeros(256)
            .err();
        assert!(
            matches!(&e, GgufError::UnknownTensorType { name, id: i } if name == "t" && *i == id),
            "{e}"
        );
    }
}

#[test]
fn duplicate_tensor_name() {
    let e = B::header(3, 2, 0)
        .tensor("output.weight", &[8], GGML_F32, 0)
        .tensor("output.weight", &[8], GGML_F32, 32)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::DuplicateTensor { name } if name == "output.weight"),
        "{e}"
    );
}

// --- tensor layout -----------------------------------------------------------

#[test]
fn offset_plus_size_overflows() {
    let offset = u64::MAX - 31; // aligned, but offset + 32 wraps
    let e = B::header(3, 1, 0)
        .tensor("w", &[8], GGML_F32, offset)
        .pad(32)
        .zeros(32)
        .err();
    assert!(
        matches!(&e, GgufError::DataOutOfBounds { name, offset: o, .. } if name == "w" && *o == offset),
        "{e}"
    );
}

#[test]
fn offset_not_aligned() {
    let e = B::header(3, 1, 0)
        .tensor("w", &[8], GGML_F32, 4)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::MisalignedOffset { name, offset: 4, alignment: 32 } if name == "w"),
        "{e}"
    );
}

#[test]
fn tensor_data_past_eof() {
    // 64 bytes of data declared, 32 present.
    let e = B::header(3, 1, 0)
        .tensor("w", &[16], GGML_F32, 0)
        .pad(32)
        .zeros(32)
        .err();
    assert!(
        matches!(&e, GgufError::DataOutOfBounds { name, size: 64, data_len: 32, .. } if name == "w"),
        "{e}"
    );
    // The second tensor is the one that does not fit.
    let e = B::header(3, 2, 0)
        .tensor("a", &[8], GGML_F32, 0)
        .tensor("b", &[8], GGML_F32, 32)
        .pad(32)
        .zeros(40)
        .err();
    assert!(
        matches!(&e, GgufError::DataOutOfBounds { name, .. } if name == "b"),
        "{e}"
    );
}

#[test]
fn overlapping_tensors() {
    let e = B::header(3, 2, 0)
        .tensor("a", &[16], GGML_F32, 0)
        .tensor("b", &[16], GGML_F32, 32)
        .pad(32)
        .zeros(128)
        .err();
    assert!(
        matches!(&e, GgufError::Overlap { name, other } if name == "b" && other == "a"),
        "{e}"
    );
    // The same offset twice.
    let e = B::header(3, 2, 0)
        .tensor("a", &[8], GGML_F32, 0)
        .tensor("b", &[8], GGML_F32, 0)
        .pad(32)
        .zeros(64)
        .err();
    assert!(matches!(e, GgufError::Overlap { .. }), "{e}");
}

#[test]
fn offset_not_the_running_padded_sum() {
    // A gap before the first tensor.
    let e = B::header(3, 1, 0)
        .tensor("w", &[8], GGML_F32, 32)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::UnexpectedOffset { name, offset: 32, expected: 0 } if name == "w"),
        "{e}"
    );
    // Disjoint and aligned, but not in file order.
    let e = B::header(3, 2, 0)
        .tensor("a", &[8], GGML_F32, 32)
        .tensor("b", &[8], GGML_F32, 0)
        .pad(32)
        .zeros(64)
        .err();
    assert!(
        matches!(&e, GgufError::UnexpectedOffset { name, .. } if name == "a"),
        "{e}"
    );
    // A gap between tensors.
    let e = B::header(3, 2, 0)
        .tensor("a", &[8], GGML_F32, 0)
        .tensor("b", &[8], GGML_F32, 64)
        .pad(32)
        .zeros(96)
        .err();
    assert!(
        matches!(&e, GgufError::UnexpectedOffset { name, offset: 64, expected: 32 } if name == "b"),
        "{e}"
    );
}

#[test]
fn truncated_after_the_header() {
    // Tensor infos complete, but neither padding nor data follows.
    let e = B::header(3, 1, 0).tensor("w", &[8], GGML_F32, 0).err();
    assert!(
        matches!(&e, GgufError::Truncated { what, .. } if what.contains("padding")),
        "{e}"
    );
    // Padding present, data missing.
    let e = B::header(3, 1, 0)
        .tensor("w", &[8], GGML_F32, 0)
        .pad(32)
        .err();
    assert!(
        matches!(&e, GgufError::DataOutOfBounds { name, data_len: 0, .. } if name == "w"),
        "{e}"
    );
    // Cut inside the tensor infos.
    let full = B::header(3, 1, 0)
        .tensor("blk.0.attn_q.weight", &[8], GGML_F32, 0)
        .0;
    let e = Gguf::from_bytes(full[..full.len() - 3].to_vec()).unwrap_err();
    assert!(
        matches!(&e, GgufError::Truncated { what, .. } if what.contains("\"blk.0.attn_q.weight\"")),
        "{e}"
    );
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", Value::String("llama".into()))
        .add_kv("v", Value::Array(Array::U32(vec![1, 2, 3])))
        .add_tensor("a", &[32], GgmlType::Q8_0, vec![1; 34])
        .add_tensor("b", &[3], GgmlType::F32, vec![2; 12]);
    let full = w.to_bytes().unwrap();
    Gguf::from_bytes(full.clone()).unwrap();
    // Up to the end of the last tensor's data; its trailing padding is optional.
    let last_end = full.len() - 20;
    for len in 0..last_end {
        assert!(
            Gguf::from_bytes(full[..len].to_vec()).is_err(),
            "accepted a file cut at {len}"
        );
    }
}

#[test]
fn truncated_file_on_disk_is_an_error_not_sigbus() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf_malformed_mmap");
    std::fs::create_dir_all(&dir).unwrap();
    let full = one_f32_tensor(1024).0;
    for (name, len) in [
        ("empty", 0),
        ("short", 10),
        ("header", 100),
        ("data", full.len() - 1),
    ] {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, &full[..len]).unwrap();
        let e = Gguf::open(&path).unwrap_err();
        assert!(
            matches!(
                e,
                GgufError::Truncated { .. } | GgufError::DataOutOfBounds { .. }
            ),
            "{name}: {e}"
        );
    }
    let e = Gguf::open(&dir.join("missing.gguf")).unwrap_err();
    assert!(
        matches!(&e, GgufError::Io { path, .. } if path.ends_with("missing.gguf")),
        "{e}"
    );
}

// --- messages ----------------------------------------------------------------

/// One file for each way of being malformed, for the message check and as
/// fuzzing seeds.
fn malformed_cases() -> Vec<B> {
    vec![
        B::default().raw(b"XXXX").u32(3).u64(0).u64(0),
        B::header(1, 0, 0),
        B::default().raw(b"GGUF\x03"),
        B::header(3, u64::MAX, 0),
        B::header(3, 0, u64::MAX),
        B::header(3, 0, 1).key("s", STRING).u64(u64::MAX),
        B::header(3, 0, 1).key("s", STRING).u64(1).raw(&[0xFF]),
        B::header(3, 0, 1).key("k", 99),
        B::header(3, 0, 1).key("b", BOOL).u8(9),
        B::header(3, 0, 1).key("a", ARRAY).array(U32, 1 << 30),
        B::header(3, 0, 1)
            .key("a", ARRAY)
            .array(STRING, 2)
            .str("x")
            .u64(9)
            .raw(b"y"),
        B::header(3, 0, 1)
            .key("a", ARRAY)
            .array(ARRAY, 1)
            .array(ARRAY, 1)
            .array(77, 0),
        B::header(3, 0, 2).kv_u32("d", 1).kv_u32("d", 1),
        B::header(3, 0, 1).kv_u32("general.alignment", 13),
        B::header(3, 0, 1).key("general.alignment", U64).u64(64),
        B::header(3, 1, 0).tensor("t", &[0], GGML_F32, 0).pad(32),
        B::header(3, 1, 0)
            .tensor("t", &[1, 1, 1, 1, 1], GGML_F32, 0)
            .pad(32),
        B::header(3, 1, 0).tensor("t", &[32], 77, 0).pad(32),
        B::header(3, 1, 0).tensor("t", &[33], GGML_Q4_1, 0).pad(32),
        B::header(3, 1, 0)
            .tensor("t", &[1 << 62], GGML_F32, 0)
            .pad(32),
        B::header(3, 1, 0)
            .tensor("t", &[i64::MAX as u64, 2], GGML_F32, 0)
            .pad(32),
        B::header(3, 1, 0)
            .tensor("t", &[8], GGML_F32, u64::MAX - 31)
            .pad(32)
            .zeros(32),
        B::header(3, 1, 0)
            .tensor("t", &[8], GGML_F32, 4)
            .pad(32)
            .zeros(64),
        B::header(3, 1, 0)
            .tensor("t", &[8], GGML_F32, 32)
            .pad(32)
            .zeros(64),
        B::header(3, 2, 0)
            .tensor("a", &[8], GGML_F32, 0)
            .tensor("b", &[8], GGML_F32, 0)
            .pad(32)
            .zeros(64),
        B::header(3, 2, 0)
            .tensor("a", &[8], GGML_F32, 0)
            .tensor("a", &[8], GGML_F32, 32)
            .pad(32)
            .zeros(64),
        B::header(3, 1, 0).tensor("t", &[8], GGML_F32, 0).pad(32),
        B::header(3, 1, 0).tensor("t", &[8], GGML_F32, 0),
        // A hostile key with a line break and a megabyte of text.
        B::header(3, 0, 2)
            .kv_u32(&format!("a\nb{}", "x".repeat(1 << 20)), 1)
            .kv_u32(&format!("a\nb{}", "x".repeat(1 << 20)), 1),
    ]
}

#[test]
fn every_error_displays_on_one_line() {
    for b in malformed_cases() {
        let e = b.err();
        assert_one_line(&e);
        let len = e.to_string().len();
        assert!(len < 1000, "error message too long: {len} bytes");
    }
    let g = B::header(3, 0, 1).kv_u32("k", 1).pad(32).parse().unwrap();
    assert_one_line(&g.metadata().get_str("k").unwrap_err());
    assert_one_line(&g.metadata().get_str("absent").unwrap_err());
    let mut w = GgufWriter::new();
    w.add_tensor("t", &[8], GgmlType::F32, vec![]);
    assert_one_line(&w.to_bytes().unwrap_err());
}

/// Small valid files, with every value type and several tensor types.
fn valid_cases() -> Vec<Vec<u8>> {
    let mut plain = GgufWriter::with_version(2);
    plain
        .add_kv("general.architecture", Value::String("llama".into()))
        .add_kv("llama.block_count", Value::U32(2))
        .add_kv("general.alignment", Value::U32(16))
        .add_kv("f", Value::F32(1.5))
        .add_kv("b", Value::Bool(true))
        .add_kv(
            "tokens",
            Value::Array(Array::String(vec!["<s>".into(), "a".into()])),
        )
        .add_kv("types", Value::Array(Array::I32(vec![3, 1])))
        .add_tensor("token_embd.weight", &[32, 2], GgmlType::Q8_0, vec![7; 68])
        .add_tensor("norm", &[4], GgmlType::F32, vec![0; 16]);
    let mut values = GgufWriter::new();
    values
        .add_kv("u8", Value::U8(1))
        .add_kv("i8", Value::I8(-1))
        .add_kv("u16", Value::U16(2))
        .add_kv("i16", Value::I16(-2))
        .add_kv("i32", Value::I32(-3))
        .add_kv("u64", Value::U64(4))
        .add_kv("i64", Value::I64(-4))
        .add_kv("f64", Value::F64(0.5))
        .add_kv(
            "nested",
            Value::Array(Array::Array(vec![
                Array::U16(vec![1]),
                Array::Bool(vec![false]),
            ])),
        )
        .add_tensor("q", &[32], GgmlType::Q4_1, vec![1; 20])
        .add_tensor("h", &[2, 2], GgmlType::F16, vec![2; 8]);
    vec![
        GgufWriter::new().to_bytes().unwrap(),
        plain.to_bytes().unwrap(),
        values.to_bytes().unwrap(),
        one_f32_tensor(4).0,
    ]
}

/// Refreshes the committed seed corpus from the cases above.
#[test]
#[ignore = "writes fuzz/seeds/gguf_reader; run by hand (see fuzz/README.md)"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf_reader");
    std::fs::create_dir_all(&dir).unwrap();
    let malformed = malformed_cases().into_iter().map(|b| b.0);
    for (i, bytes) in malformed.filter(|b| b.len() <= 4096).enumerate() {
        std::fs::write(dir.join(format!("malformed-{i:02}.gguf")), bytes).unwrap();
    }
    for (i, bytes) in valid_cases().into_iter().enumerate() {
        Gguf::from_bytes(bytes.clone()).unwrap();
        std::fs::write(dir.join(format!("valid-{i:02}.gguf")), bytes).unwrap();
    }
}
