//! GGUF reader and writer (versions 2 and 3, little-endian).
//!
//! A GGUF file is hostile input. The reader bounds every declared count and
//! length by the bytes that remain before it allocates, uses checked
//! arithmetic on every size, and validates the whole tensor layout against the
//! file length at open. After that, [`Gguf::tensor_data`] is a plain slice of
//! validated bytes: a well-formed mapping is never read out of bounds.
//!
//! Layout: magic `GGUF`, u32 version, u64 tensor count, u64 key/value count,
//! the key/value pairs, the tensor infos, padding to `general.alignment`
//! (default 32), then the data section. Tensor offsets are relative to the
//! data section and must be the running padded sum of the sizes in file
//! order, which is what llama.cpp and the `gguf` Python package write.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::Mmap;
use thiserror::Error;

use super::dtype::GgmlType;

const MAGIC: [u8; 4] = *b"GGUF";
/// Magic, version, tensor count, key/value count.
const HEADER_LEN: u64 = 4 + 4 + 8 + 8;
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Larger alignments only waste space; 2^31 overflows llama.cpp's `int`.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Arrays of arrays nest at most this deep (the top-level array is depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Strings (keys, values, tokens, tensor names) are at most `i32::MAX` bytes:
/// llama.cpp stores token lengths in an `int32_t`.
pub const MAX_STRING_LEN: u64 = i32::MAX as u64;
/// Input-derived names are clipped to this many bytes in error messages.
const MAX_NAME_IN_ERROR: usize = 200;

// ---------------------------------------------------------------------------
// Errors

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("I/O error on GGUF file {path:?}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("not a GGUF file: magic bytes {found:02x?}, expected 47 47 55 46 (\"GGUF\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {version} (loip reads versions 2 and 3, little-endian)")]
    UnsupportedVersion { version: u32 },
    #[error("truncated: {what} at offset {offset} needs {needed} bytes, only {available} remain")]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        available: u64,
    },
    #[error(
        "{what} at offset {offset}: count {count} cannot fit in the {available} bytes that remain"
    )]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        available: u64,
    },
    #[error("{what} at offset {offset} is {len} bytes long, over the limit of {max}")]
    StringTooLong {
        what: String,
        offset: u64,
        len: u64,
        max: u64,
    },
    #[error("{what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },
    #[error("key {key:?}: unknown value type id {id}")]
    UnknownValueType { key: String, id: u32 },
    #[error("key {key:?}: bool stored as byte {byte}, expected 0 or 1")]
    InvalidBool { key: String, byte: u8 },
    #[error("key {key:?}: arrays nested deeper than {max} levels")]
    ArrayTooDeep { key: String, max: usize },
    #[error("duplicate key {key:?}")]
    DuplicateKey { key: String },
    #[error("key \"general.alignment\": {reason}")]
    BadAlignment { reason: String },
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor { name: String },
    #[error("tensor {name:?}: {n_dims} dimensions, expected 1 to {max}")]
    BadDimCount {
        name: String,
        n_dims: u64,
        max: usize,
    },
    #[error("tensor {name:?}: dimension {index} is {value}, expected 1 to 2^63-1")]
    BadDim {
        name: String,
        index: usize,
        value: u64,
    },
    #[error("tensor {name:?}: unknown ggml type id {id}")]
    UnknownTensorType { name: String, id: u32 },
    #[error("tensor {name:?}: element count of shape {dims:?} overflows")]
    ShapeOverflow { name: String, dims: Vec<u64> },
    #[error("tensor {name:?}: row length {ne0} is not a multiple of the {ty} block size {block}")]
    RowNotBlockMultiple {
        name: String,
        ty: GgmlType,
        ne0: u64,
        block: usize,
    },
    #[error("tensor {name:?}: byte size of shape {dims:?} as {ty} overflows")]
    SizeOverflow {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
    },
    #[error("tensor {name:?}: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset {
        name: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {name:?}: {size} bytes at offset {offset} end past the data section ({data_len} bytes)")]
    DataOutOfBounds {
        name: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },
    #[error("tensor {name:?} overlaps tensor {other:?}")]
    Overlap { name: String, other: String },
    #[error("tensor {name:?}: offset {offset}, expected {expected} (tensors must be packed in file order)")]
    UnexpectedOffset {
        name: String,
        offset: u64,
        expected: u64,
    },
    #[error("tensor {name:?}: {found} bytes of data, shape {dims:?} as {ty} needs {expected}")]
    TensorDataSize {
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        expected: u64,
        found: u64,
    },
    #[error("tensor {name:?}: its data source failed: {source}")]
    TensorSource { name: String, source: io::Error },
    #[error("key {key:?} is missing")]
    MissingKey { key: String },
    #[error("key {key:?}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("key {key:?}: value {value} does not fit in {target}")]
    OutOfRange {
        key: String,
        value: i128,
        target: &'static str,
    },
}

/// Turns a typed getter's `MissingKey` into `None`:
/// `meta.get_u32("llama.expert_count").optional()?`.
pub trait OptionalKey<T> {
    fn optional(self) -> Result<Option<T>, GgufError>;
}

impl<T> OptionalKey<T> for Result<T, GgufError> {
    fn optional(self) -> Result<Option<T>, GgufError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(GgufError::MissingKey { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// An input-derived name for an error message: a hostile file may hold a
/// gigabyte-long key.
fn clip(s: &str) -> String {
    if s.len() <= MAX_NAME_IN_ERROR {
        return s.to_owned();
    }
    let mut end = MAX_NAME_IN_ERROR;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

type Result<T, E = GgufError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------
// Values

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Array),
}

/// A homogeneous array. Arrays of arrays may mix element types.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
}

/// The value type ids GGUF stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies: a bound on how many
    /// can fit in what remains of the file.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 4 + 8,
        }
    }
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(a) => a.type_name(),
        }
    }

    /// Any integer type, widened losslessly.
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
        }
    }
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Array::U8(_) => "array of u8",
            Array::I8(_) => "array of i8",
            Array::U16(_) => "array of u16",
            Array::I16(_) => "array of i16",
            Array::U32(_) => "array of u32",
            Array::I32(_) => "array of i32",
            Array::U64(_) => "array of u64",
            Array::I64(_) => "array of i64",
            Array::F32(_) => "array of f32",
            Array::F64(_) => "array of f64",
            Array::Bool(_) => "array of bool",
            Array::String(_) => "array of string",
            Array::Array(_) => "array of arrays",
        }
    }

    fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F32(_) => ValueType::F32,
            Array::F64(_) => ValueType::F64,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
        }
    }

    /// Whether arrays nest more than `max` levels (an array of scalars is
    /// one level). Descends at most `max + 1` levels, whatever the value.
    fn deeper_than(&self, max: usize) -> bool {
        match (self, max.checked_sub(1)) {
            (_, None) => true,
            (Array::Array(v), Some(rest)) => v.iter().any(|a| a.deeper_than(rest)),
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------
// Metadata

/// The key/value pairs in file order, with an index by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Appends a pair; a key may appear once.
    fn insert(&mut self, key: String, value: Value) -> Result<()> {
        if self.index.contains_key(&key) {
            return Err(GgufError::DuplicateKey { key: clip(&key) });
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        let i = *self.index.get(key)?;
        self.entries.get(i).map(|(_, v)| v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey { key: clip(key) })
    }

    fn integer(&self, key: &str) -> Result<i128> {
        let v = self.require(key)?;
        v.as_integer()
            .ok_or_else(|| wrong_type(key, "an integer", v))
    }

    /// Any integer type whose value fits in a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let n = self.integer(key)?;
        u32::try_from(n).map_err(|_| out_of_range(key, n, "u32"))
    }

    /// Any integer type whose value fits in a u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let n = self.integer(key)?;
        u64::try_from(n).map_err(|_| out_of_range(key, n, "u64"))
    }

    /// An f32, or an f64 rounded to f32.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            Value::F32(v) => Ok(*v),
            Value::F64(v) => Ok(*v as f32),
            v => Err(wrong_type(key, "f32", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            Value::Bool(v) => Ok(*v),
            v => Err(wrong_type(key, "bool", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(v) => Ok(v),
            v => Err(wrong_type(key, "string", v)),
        }
    }

    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.require(key)? {
            Value::Array(Array::String(v)) => Ok(v),
            v => Err(wrong_type(key, "array of string", v)),
        }
    }

    pub fn get_i32_array(&self, key: &str) -> Result<&[i32]> {
        match self.require(key)? {
            Value::Array(Array::I32(v)) => Ok(v),
            v => Err(wrong_type(key, "array of i32", v)),
        }
    }

    pub fn get_f32_array(&self, key: &str) -> Result<&[f32]> {
        match self.require(key)? {
            Value::Array(Array::F32(v)) => Ok(v),
            v => Err(wrong_type(key, "array of f32", v)),
        }
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: clip(key),
        expected,
        found: found.type_name(),
    }
}

fn out_of_range(key: &str, value: i128, target: &'static str) -> GgufError {
    GgufError::OutOfRange {
        key: clip(key),
        value,
        target,
    }
}

/// The value of `general.alignment`, if set: a u32 power of two up to
/// [`MAX_ALIGNMENT`].
fn alignment_of(value: Option<&Value>) -> Result<u64> {
    let bad = |reason: String| GgufError::BadAlignment { reason };
    match value {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) => {
            let a = u64::from(*a);
            if a.is_power_of_two() && a <= MAX_ALIGNMENT {
                Ok(a)
            } else {
                Err(bad(format!(
                    "{a} is not a power of two between 1 and {MAX_ALIGNMENT}"
                )))
            }
        }
        Some(v) => Err(bad(format!("stored as {}, expected u32", v.type_name()))),
    }
}

fn align_up(n: u64, alignment: u64) -> Option<u64> {
    let rem = n % alignment;
    if rem == 0 {
        Some(n)
    } else {
        n.checked_add(alignment - rem)
    }
}

// ---------------------------------------------------------------------------
// Tensor infos

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Relative to the data section.
    pub offset: u64,
    /// Bytes of data.
    pub size: u64,
}

impl TensorInfo {
    /// Exact for a tensor read by [`Gguf`] (validated not to overflow).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Rows of `dims[0]` elements.
    pub fn n_rows(&self) -> u64 {
        self.dims
            .iter()
            .skip(1)
            .fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> u64 {
        let ne0 = self.dims.first().copied().unwrap_or(1);
        self.ty.row_bytes(ne0).unwrap_or(0)
    }
}

/// Checks a tensor's shape against its type and returns its byte size.
/// Shared by the reader and the writer so both accept the same tensors.
fn tensor_size(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(GgufError::BadDimCount {
            name: clip(name),
            n_dims: dims.len() as u64,
            max: MAX_DIMS,
        });
    }
    // ggml stores dims as int64: zero and "negative" dims are invalid.
    for (index, &value) in dims.iter().enumerate() {
        if value == 0 || value > i64::MAX as u64 {
            return Err(GgufError::BadDim {
                name: clip(name),
                index,
                value,
            });
        }
    }
    let n_elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    if n_elements.is_none() {
        return Err(GgufError::ShapeOverflow {
            name: clip(name),
            dims: dims.to_vec(),
        });
    }
    let ne0 = dims.first().copied().unwrap_or(1);
    let block = ty.block_size();
    if ne0 % block as u64 != 0 {
        return Err(GgufError::RowNotBlockMultiple {
            name: clip(name),
            ty,
            ne0,
            block,
        });
    }
    let n_rows = dims
        .iter()
        .skip(1)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d));
    ty.row_bytes(ne0)
        .zip(n_rows)
        .and_then(|(row, rows)| row.checked_mul(rows))
        .filter(|&size| size <= i64::MAX as u64)
        .ok_or_else(|| GgufError::SizeOverflow {
            name: clip(name),
            dims: dims.to_vec(),
            ty,
        })
}

// ---------------------------------------------------------------------------
// Reading

/// What is being read, for error messages; rendered only on error.
#[derive(Clone, Copy)]
enum Ctx<'a> {
    Header(&'static str),
    Key(u64),
    Value(&'a str),
    TensorName(u64),
    Tensor(&'a str),
    DataPadding,
}

impl fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Ctx::Header(field) => write!(f, "header field {field}"),
            Ctx::Key(i) => write!(f, "key of metadata entry #{i}"),
            Ctx::Value(key) => write!(f, "value of key {:?}", clip(key)),
            Ctx::TensorName(i) => write!(f, "name of tensor info #{i}"),
            Ctx::Tensor(name) => write!(f, "info of tensor {:?}", clip(name)),
            Ctx::DataPadding => f.write_str("padding before the tensor data"),
        }
    }
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn take(&mut self, n: u64, ctx: Ctx) -> Result<&'a [u8]> {
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| Some(self.pos..self.pos.checked_add(n)?))
            .and_then(|range| self.buf.get(range));
        match slice {
            Some(s) => {
                self.pos += s.len();
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what: ctx.to_string(),
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, ctx: Ctx) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, ctx)?);
        Ok(out)
    }

    fn u8(&mut self, ctx: Ctx) -> Result<u8> {
        Ok(self.array::<1>(ctx)?[0])
    }

    fn u32(&mut self, ctx: Ctx) -> Result<u32> {
        self.array(ctx).map(u32::from_le_bytes)
    }

    fn u64(&mut self, ctx: Ctx) -> Result<u64> {
        self.array(ctx).map(u64::from_le_bytes)
    }

    /// A u64 element count, rejected unless `count` elements of at least
    /// `min_size` bytes each fit in what remains: no allocation is ever sized
    /// by a count the file cannot back.
    fn count(&mut self, min_size: u64, ctx: Ctx) -> Result<usize> {
        let offset = self.offset();
        let count = self.u64(ctx)?;
        self.check_count(count, min_size, offset, ctx)
    }

    /// Rejects `count` unless that many elements of at least `min_size`
    /// bytes fit in what remains (the check needs no allocation).
    fn check_count(&self, count: u64, min_size: u64, offset: u64, ctx: Ctx) -> Result<usize> {
        let available = self.remaining();
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|bytes| bytes <= available);
        match usize::try_from(count) {
            Ok(n) if fits => Ok(n),
            _ => Err(GgufError::CountTooLarge {
                what: ctx.to_string(),
                offset,
                count,
                available,
            }),
        }
    }

    fn string(&mut self, ctx: Ctx) -> Result<String> {
        let offset = self.offset();
        let len = self.u64(ctx)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                what: ctx.to_string(),
                offset,
                len,
                max: MAX_STRING_LEN,
            });
        }
        let bytes = self.take(len, ctx)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 {
                what: ctx.to_string(),
                offset,
            }),
        }
    }
}

/// Decodes a run of little-endian scalars of `N` bytes each.
fn decode<const N: usize, T>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            f(a)
        })
        .collect()
}

fn read_bool(c: &mut Cursor, key: &str) -> Result<bool> {
    match c.u8(Ctx::Value(key))? {
        0 => Ok(false),
        1 => Ok(true),
        byte => Err(GgufError::InvalidBool {
            key: clip(key),
            byte,
        }),
    }
}

fn value_type(id: u32, key: &str) -> Result<ValueType> {
    ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType { key: clip(key), id })
}

fn read_value(c: &mut Cursor, ty: ValueType, key: &str) -> Result<Value> {
    let ctx = Ctx::Value(key);
    Ok(match ty {
        ValueType::U8 => Value::U8(c.u8(ctx)?),
        ValueType::I8 => Value::I8(c.array(ctx).map(i8::from_le_bytes)?),
        ValueType::U16 => Value::U16(c.array(ctx).map(u16::from_le_bytes)?),
        ValueType::I16 => Value::I16(c.array(ctx).map(i16::from_le_bytes)?),
        ValueType::U32 => Value::U32(c.u32(ctx)?),
        ValueType::I32 => Value::I32(c.array(ctx).map(i32::from_le_bytes)?),
        ValueType::U64 => Value::U64(c.u64(ctx)?),
        ValueType::I64 => Value::I64(c.array(ctx).map(i64::from_le_bytes)?),
        ValueType::F32 => Value::F32(c.array(ctx).map(f32::from_le_bytes)?),
        ValueType::F64 => Value::F64(c.array(ctx).map(f64::from_le_bytes)?),
        ValueType::Bool => Value::Bool(read_bool(c, key)?),
        ValueType::String => Value::String(c.string(ctx)?),
        ValueType::Array => Value::Array(read_array(c, key, 1)?),
    })
}

/// Reads an array (element type, count, elements) at nesting `depth`.
fn read_array<'a>(c: &mut Cursor<'a>, key: &str, depth: usize) -> Result<Array> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::ArrayTooDeep {
            key: clip(key),
            max: MAX_ARRAY_DEPTH,
        });
    }
    let ctx = Ctx::Value(key);
    let elem = value_type(c.u32(ctx)?, key)?;
    let n = c.count(elem.min_size(), ctx)?;
    // Fixed-size elements: `count` already proved the bytes are there, so
    // these allocations are bounded by the file size.
    let fixed = |c: &mut Cursor<'a>| c.take(n as u64 * elem.min_size(), ctx);
    Ok(match elem {
        ValueType::U8 => Array::U8(fixed(c)?.to_vec()),
        ValueType::I8 => Array::I8(decode(fixed(c)?, i8::from_le_bytes)),
        ValueType::U16 => Array::U16(decode(fixed(c)?, u16::from_le_bytes)),
        ValueType::I16 => Array::I16(decode(fixed(c)?, i16::from_le_bytes)),
        ValueType::U32 => Array::U32(decode(fixed(c)?, u32::from_le_bytes)),
        ValueType::I32 => Array::I32(decode(fixed(c)?, i32::from_le_bytes)),
        ValueType::U64 => Array::U64(decode(fixed(c)?, u64::from_le_bytes)),
        ValueType::I64 => Array::I64(decode(fixed(c)?, i64::from_le_bytes)),
        ValueType::F32 => Array::F32(decode(fixed(c)?, f32::from_le_bytes)),
        ValueType::F64 => Array::F64(decode(fixed(c)?, f64::from_le_bytes)),
        ValueType::Bool => Array::Bool((0..n).map(|_| read_bool(c, key)).collect::<Result<_>>()?),
        ValueType::String => Array::String((0..n).map(|_| c.string(ctx)).collect::<Result<_>>()?),
        ValueType::Array => Array::Array(
            (0..n)
                .map(|_| read_array(c, key, depth + 1))
                .collect::<Result<_>>()?,
        ),
    })
}

struct Header {
    version: u32,
    n_tensors: u64,
    n_kv: u64,
}

fn read_header(c: &mut Cursor) -> Result<Header> {
    let magic = c.array::<4>(Ctx::Header("magic"))?;
    if magic != MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(Ctx::Header("version"))?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { version });
    }
    // Counts are validated against the bytes left when they are used.
    let n_tensors = c.u64(Ctx::Header("tensor count"))?;
    let n_kv = c.u64(Ctx::Header("metadata count"))?;
    Ok(Header {
        version,
        n_tensors,
        n_kv,
    })
}

/// Shortest possible key/value pair: empty key, type id, one-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Shortest possible tensor info: empty name, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 8 + 4 + 8;

fn read_metadata(c: &mut Cursor, n_kv: u64) -> Result<Metadata> {
    // Offset 16: where the header stores the count.
    let n = c.check_count(n_kv, MIN_KV_SIZE, 16, Ctx::Header("metadata count"))?;
    let mut meta = Metadata::default();
    for i in 0..n {
        let key = c.string(Ctx::Key(i as u64))?;
        let ty = value_type(c.u32(Ctx::Value(&key))?, &key)?;
        let value = read_value(c, ty, &key)?;
        meta.insert(key, value)?;
    }
    Ok(meta)
}

fn read_tensor_info(c: &mut Cursor, i: u64) -> Result<TensorInfo> {
    let name = c.string(Ctx::TensorName(i))?;
    let ctx = Ctx::Tensor(&name);
    let n_dims = c.u32(ctx)?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(GgufError::BadDimCount {
            name: clip(&name),
            n_dims: n_dims.into(),
            max: MAX_DIMS,
        });
    }
    let dims = (0..n_dims)
        .map(|_| c.u64(ctx))
        .collect::<Result<Vec<u64>>>()?;
    let type_id = c.u32(ctx)?;
    let offset = c.u64(ctx)?;
    let ty = GgmlType::from_id(type_id).map_err(|_| GgufError::UnknownTensorType {
        name: clip(&name),
        id: type_id,
    })?;
    let size = tensor_size(&name, &dims, ty)?;
    Ok(TensorInfo {
        name,
        dims,
        ty,
        offset,
        size,
    })
}

fn read_tensor_infos(
    c: &mut Cursor,
    n_tensors: u64,
) -> Result<(Vec<TensorInfo>, HashMap<String, usize>)> {
    let n = c.check_count(
        n_tensors,
        MIN_TENSOR_INFO_SIZE,
        8,
        Ctx::Header("tensor count"),
    )?;
    let mut tensors = Vec::with_capacity(n.min(4096));
    let mut index = HashMap::with_capacity(n.min(4096));
    for i in 0..n {
        let t = read_tensor_info(c, i as u64)?;
        if index.insert(t.name.clone(), i).is_some() {
            return Err(GgufError::DuplicateTensor {
                name: clip(&t.name),
            });
        }
        tensors.push(t);
    }
    Ok((tensors, index))
}

/// Every tensor aligned, inside the data section, disjoint from the others,
/// and at the running padded sum of the sizes before it in file order.
fn validate_layout(tensors: &[TensorInfo], alignment: u64, data_len: u64) -> Result<()> {
    let mut ends = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::MisalignedOffset {
                name: clip(&t.name),
                offset: t.offset,
                alignment,
            });
        }
        match t.offset.checked_add(t.size) {
            Some(end) if end <= data_len => ends.push(end),
            _ => {
                return Err(GgufError::DataOutOfBounds {
                    name: clip(&t.name),
                    offset: t.offset,
                    size: t.size,
                    data_len,
                })
            }
        }
    }
    check_overlap(tensors, &ends)?;
    let mut expected = 0u64;
    for (t, &end) in tensors.iter().zip(&ends) {
        if t.offset != expected {
            return Err(GgufError::UnexpectedOffset {
                name: clip(&t.name),
                offset: t.offset,
                expected,
            });
        }
        // `end` is within the data section, so this cannot realistically
        // overflow; a hostile value still only yields an error.
        expected = align_up(end, alignment).ok_or_else(|| GgufError::DataOutOfBounds {
            name: clip(&t.name),
            offset: t.offset,
            size: t.size,
            data_len,
        })?;
    }
    Ok(())
}

fn check_overlap(tensors: &[TensorInfo], ends: &[u64]) -> Result<()> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors.get(i).map_or(0, |t| t.offset));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if let (Some(ta), Some(tb), Some(&end_a)) = (tensors.get(a), tensors.get(b), ends.get(a)) {
            if end_a > tb.offset {
                return Err(GgufError::Overlap {
                    name: clip(&tb.name),
                    other: clip(&ta.name),
                });
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The file

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// The length and modification time of a file, to notice that it changed
/// on disk while mapped (a truncated mapping faults on access).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl FileStamp {
    pub fn of(path: &Path) -> Result<FileStamp> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        Ok(FileStamp::from_metadata(&meta))
    }

    fn from_metadata(meta: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            len: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> GgufError + '_ {
    move |source| GgufError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A parsed, validated GGUF file that owns its bytes.
pub struct Gguf {
    storage: Storage,
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    data_offset: u64,
    source: Option<(PathBuf, FileStamp)>,
}

impl fmt::Debug for Gguf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path())
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.file_len())
            .finish()
    }
}

impl Gguf {
    /// Maps the file read-only and validates it.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path).map_err(io_err(path))?;
        let stamp = FileStamp::from_metadata(&file.metadata().map_err(io_err(path))?);
        let storage = if stamp.len < HEADER_LEN {
            // Too short to be GGUF; parse it from memory for the error message.
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            Storage::Owned(bytes)
        } else {
            // SAFETY: the mapping is read-only and only read within bounds
            // validated against its length. Another process truncating the
            // file while it is mapped would fault; the stamp lets callers
            // detect a change, and loip's own writer replaces files by rename.
            Storage::Mapped(unsafe { Mmap::map(&file) }.map_err(io_err(path))?)
        };
        let mut gguf = Self::parse(storage)?;
        gguf.source = Some((path.to_owned(), stamp));
        Ok(gguf)
    }

    /// Validates a GGUF file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Gguf> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Gguf> {
        let bytes = storage.bytes();
        let mut c = Cursor { buf: bytes, pos: 0 };
        let header = read_header(&mut c)?;
        let metadata = read_metadata(&mut c, header.n_kv)?;
        let alignment = alignment_of(metadata.get(ALIGNMENT_KEY))?;
        let (tensors, index) = read_tensor_infos(&mut c, header.n_tensors)?;
        let file_len = bytes.len() as u64;
        let data_offset = align_up(c.offset(), alignment)
            .filter(|&d| d <= file_len)
            .ok_or_else(|| GgufError::Truncated {
                what: Ctx::DataPadding.to_string(),
                offset: c.offset(),
                needed: alignment - c.offset() % alignment,
                available: c.remaining(),
            })?;
        validate_layout(&tensors, alignment, file_len - data_offset)?;
        Ok(Gguf {
            storage,
            version: header.version,
            alignment,
            metadata,
            tensors,
            index,
            data_offset,
            source: None,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(*self.index.get(name)?)
    }

    /// The tensor's bytes, zero-copy.
    ///
    /// # Panics
    /// If `t` is not one of this file's tensors (a caller bug): one from
    /// another file, or a modified copy.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        // Fast path: a reference into our own table; else an equal copy.
        let own = if self
            .tensors
            .as_ptr_range()
            .contains(&(t as *const TensorInfo))
        {
            Some(t)
        } else {
            self.tensor(&t.name).filter(|own| *own == t)
        };
        let range = own.and_then(|t| {
            let start = usize::try_from(self.data_offset.checked_add(t.offset)?).ok()?;
            let end = start.checked_add(usize::try_from(t.size).ok()?)?;
            Some(start..end)
        });
        match range.and_then(|r| self.storage.bytes().get(r)) {
            Some(data) => data,
            None => panic!(
                "tensor {:?} is not a tensor of this GGUF file",
                clip(&t.name)
            ),
        }
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn file_len(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// The path given to [`Gguf::open`]; `None` for [`Gguf::from_bytes`].
    pub fn path(&self) -> Option<&Path> {
        self.source.as_ref().map(|(p, _)| p.as_path())
    }

    /// Length and mtime at open; compare with [`FileStamp::of`] to notice a
    /// file changed on disk while mapped.
    pub fn file_stamp(&self) -> Option<&FileStamp> {
        self.source.as_ref().map(|(_, s)| s)
    }
}

// ---------------------------------------------------------------------------
// Writing

/// Writes a tensor's bytes into the sink it is given.
pub type TensorFill = Box<dyn Fn(&mut dyn Write) -> io::Result<()> + Send + Sync>;

enum TensorData {
    Bytes(Vec<u8>),
    Fill(TensorFill),
}

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: TensorData,
}

/// Builds a GGUF file. Calls chain; every input is validated when the file
/// is produced ([`GgufWriter::to_bytes`], [`GgufWriter::write`]) by the same
/// rules the reader applies, so the writer never emits a file the reader
/// rejects.
pub struct GgufWriter {
    version: u32,
    kvs: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

/// What validation yields: the alignment and each tensor's info, in order.
struct Layout {
    alignment: u64,
    infos: Vec<TensorInfo>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// Version 3; alignment 32 unless `general.alignment` is added.
    pub fn new() -> Self {
        Self::with_version(3)
    }

    /// Version 2 or 3 (their little-endian layouts are the same).
    pub fn with_version(version: u32) -> Self {
        GgufWriter {
            version,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn add_kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kvs.push((key.to_owned(), value));
        self
    }

    /// Adds a tensor with its bytes, which must match the shape exactly.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        self.push_tensor(name, dims, ty, TensorData::Bytes(data))
    }

    /// Adds a tensor whose bytes `fill` writes when the file is produced, so
    /// a multi-gigabyte model need not be held in memory. `fill` must write
    /// exactly the tensor's byte size, and is called once per
    /// [`GgufWriter::to_bytes`] or [`GgufWriter::write`].
    pub fn add_tensor_with(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        fill: impl Fn(&mut dyn Write) -> io::Result<()> + Send + Sync + 'static,
    ) -> &mut Self {
        self.push_tensor(name, dims, ty, TensorData::Fill(Box::new(fill)))
    }

    fn push_tensor(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: TensorData,
    ) -> &mut Self {
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        self
    }

    /// Validates everything and assigns offsets.
    fn layout(&self) -> Result<Layout> {
        if self.version != 2 && self.version != 3 {
            return Err(GgufError::UnsupportedVersion {
                version: self.version,
            });
        }
        let mut keys = HashSet::with_capacity(self.kvs.len());
        for (key, value) in &self.kvs {
            if !keys.insert(key.as_str()) {
                return Err(GgufError::DuplicateKey { key: clip(key) });
            }
            check_string_len(key)?;
            check_value(key, value)?;
        }
        let alignment = alignment_of(
            self.kvs
                .iter()
                .find(|(k, _)| k == ALIGNMENT_KEY)
                .map(|(_, v)| v),
        )?;
        let mut names = HashSet::with_capacity(self.tensors.len());
        let mut infos = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(GgufError::DuplicateTensor {
                    name: clip(&t.name),
                });
            }
            check_string_len(&t.name)?;
            let info = pending_info(t, offset)?;
            offset = info
                .offset
                .checked_add(info.size)
                .and_then(|end| align_up(end, alignment))
                .ok_or_else(|| GgufError::SizeOverflow {
                    name: clip(&t.name),
                    dims: t.dims.clone(),
                    ty: t.ty,
                })?;
            infos.push(info);
        }
        Ok(Layout { alignment, infos })
    }

    /// Header, key/value pairs, tensor infos and the padding after them.
    fn header_bytes(&self, layout: &Layout) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        put_u32(&mut out, self.version);
        put_u64(&mut out, layout.infos.len() as u64);
        put_u64(&mut out, self.kvs.len() as u64);
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            put_u32(&mut out, value.value_type() as u32);
            put_value(&mut out, value);
        }
        for t in &layout.infos {
            put_str(&mut out, &t.name);
            put_u32(&mut out, t.dims.len() as u32);
            for &d in &t.dims {
                put_u64(&mut out, d);
            }
            put_u32(&mut out, t.ty.id());
            put_u64(&mut out, t.offset);
        }
        pad(&mut out, layout.alignment);
        out
    }

    /// Streams every tensor's data, each padded to the alignment.
    /// `sink_err` reports a failure of `out` itself.
    fn write_data(
        &self,
        out: &mut dyn Write,
        layout: &Layout,
        sink_err: &dyn Fn(io::Error) -> GgufError,
    ) -> Result<()> {
        let zeros = vec![0u8; layout.alignment as usize];
        for (t, info) in self.tensors.iter().zip(&layout.infos) {
            match &t.data {
                TensorData::Bytes(b) => out.write_all(b).map_err(sink_err)?,
                TensorData::Fill(fill) => write_filled(out, info, fill, sink_err)?,
            }
            let padded = align_up(info.size, layout.alignment).unwrap_or(info.size);
            let padding = zeros.get(..(padded - info.size) as usize).unwrap_or(&[]);
            out.write_all(padding).map_err(sink_err)?;
        }
        Ok(())
    }

    /// The size of the file [`GgufWriter::write`] would produce.
    pub fn file_len(&self) -> Result<u64> {
        let layout = self.layout()?;
        // Each tensor is padded to the alignment, as `write_data` does.
        let data = layout.infos.last().map_or(0, |t| {
            t.offset + align_up(t.size, layout.alignment).unwrap_or(t.size)
        });
        Ok(self.header_bytes(&layout).len() as u64 + data)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let layout = self.layout()?;
        let mut out = self.header_bytes(&layout);
        let data_len = layout.infos.last().map_or(0, |t| t.offset + t.size);
        out.reserve(usize::try_from(data_len).unwrap_or(0));
        // Writing to a Vec cannot fail; a fill closure can.
        let sink_err = io_err(Path::new("<memory>"));
        self.write_data(&mut out, &layout, &sink_err)?;
        Ok(out)
    }

    /// Writes to a temporary file in the same directory, syncs it and renames
    /// it over `path`, so no reader ever sees a half-written model. Tensor
    /// data is streamed, not assembled in memory.
    pub fn write(&self, path: &Path) -> Result<()> {
        let layout = self.layout()?;
        let tmp = temp_path(path);
        let result = self
            .write_file(&tmp, &layout)
            .and_then(|()| std::fs::rename(&tmp, path).map_err(io_err(path)));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return result;
        }
        sync_parent_dir(path)
    }

    fn write_file(&self, tmp: &Path, layout: &Layout) -> Result<()> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(tmp)
            .map_err(io_err(tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&self.header_bytes(layout))
            .map_err(io_err(tmp))?;
        self.write_data(&mut out, layout, &io_err(tmp))?;
        let file = out.into_inner().map_err(|e| io_err(tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err(tmp))
    }
}

/// The reader's limit on string lengths, applied to what the writer emits.
fn check_string_len(s: &str) -> Result<()> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(GgufError::StringTooLong {
            what: format!("string {:?}", clip(s)),
            offset: 0,
            len: s.len() as u64,
            max: MAX_STRING_LEN,
        });
    }
    Ok(())
}

fn check_value(key: &str, value: &Value) -> Result<()> {
    match value {
        Value::String(s) => check_string_len(s),
        Value::Array(a) if a.deeper_than(MAX_ARRAY_DEPTH) => Err(GgufError::ArrayTooDeep {
            key: clip(key),
            max: MAX_ARRAY_DEPTH,
        }),
        Value::Array(a) => check_array_strings(a),
        _ => Ok(()),
    }
}

fn check_array_strings(a: &Array) -> Result<()> {
    match a {
        Array::String(v) => v.iter().try_for_each(|s| check_string_len(s)),
        Array::Array(v) => v.iter().try_for_each(check_array_strings),
        _ => Ok(()),
    }
}

/// A pending tensor's info at `offset`, its data checked against its shape.
fn pending_info(t: &PendingTensor, offset: u64) -> Result<TensorInfo> {
    let size = tensor_size(&t.name, &t.dims, t.ty)?;
    if let TensorData::Bytes(b) = &t.data {
        if b.len() as u64 != size {
            return Err(GgufError::TensorDataSize {
                name: clip(&t.name),
                dims: t.dims.clone(),
                ty: t.ty,
                expected: size,
                found: b.len() as u64,
            });
        }
    }
    Ok(TensorInfo {
        name: t.name.clone(),
        dims: t.dims.clone(),
        ty: t.ty,
        offset,
        size,
    })
}

/// Runs a tensor's fill closure, checking that it writes exactly the
/// tensor's size, and telling its own failures apart from the sink's.
fn write_filled(
    out: &mut dyn Write,
    info: &TensorInfo,
    fill: &TensorFill,
    sink_err: &dyn Fn(io::Error) -> GgufError,
) -> Result<()> {
    let mut counted = Counted {
        inner: out,
        written: 0,
        limit: info.size,
        sink_error: None,
    };
    let result = fill(&mut counted);
    if let Some(e) = counted.sink_error.take() {
        return Err(sink_err(e));
    }
    let size_error = GgufError::TensorDataSize {
        name: clip(&info.name),
        dims: info.dims.clone(),
        ty: info.ty,
        expected: info.size,
        found: counted.written,
    };
    match result {
        Err(_) if counted.written > info.size => Err(size_error),
        Err(source) => Err(GgufError::TensorSource {
            name: clip(&info.name),
            source,
        }),
        Ok(()) if counted.written != info.size => Err(size_error),
        Ok(()) => Ok(()),
    }
}

/// A sink that counts bytes and refuses to go past `limit`.
struct Counted<'a> {
    inner: &'a mut dyn Write,
    written: u64,
    limit: u64,
    sink_error: Option<io::Error>,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.limit.saturating_sub(self.written);
        if buf.len() as u64 > room {
            // Counted so that the caller reports the size mismatch.
            self.written = self.written.saturating_add(buf.len() as u64);
            return Err(io::Error::other("tensor data longer than its shape"));
        }
        match self.inner.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.sink_error = Some(e);
                Err(io::Error::new(kind, "output failed"))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn temp_path(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Makes the rename durable.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn pad(out: &mut Vec<u8>, alignment: u64) {
    let len = out.len() as u64;
    let padded = align_up(len, alignment).unwrap_or(len);
    out.resize(padded as usize, 0);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => put_u32(out, *x),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => put_u64(out, *x),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    put_u32(out, a.elem_type() as u32);
    put_u64(out, a.len() as u64);
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::U16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::U64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        Array::Bool(v) => v.iter().for_each(|x| out.push(u8::from(*x))),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_up_is_checked() {
        assert_eq!(align_up(0, 32), Some(0));
        assert_eq!(align_up(1, 32), Some(32));
        assert_eq!(align_up(64, 32), Some(64));
        assert_eq!(align_up(u64::MAX - 3, 32), None);
    }

    #[test]
    fn clip_keeps_char_boundaries() {
        let s = "é".repeat(MAX_NAME_IN_ERROR);
        let c = clip(&s);
        assert!(c.len() <= MAX_NAME_IN_ERROR + '…'.len_utf8());
        assert!(c.ends_with('…'));
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn depth_check_matches_the_reader_and_stops_early() {
        let mut a = Array::U8(vec![]);
        assert!(!a.deeper_than(1) && a.deeper_than(0));
        for _ in 1..MAX_ARRAY_DEPTH {
            a = Array::Array(vec![Array::Bool(vec![]), a]);
        }
        assert!(!a.deeper_than(MAX_ARRAY_DEPTH));
        assert!(Array::Array(vec![a]).deeper_than(MAX_ARRAY_DEPTH));
        assert!(!Array::Array(vec![]).deeper_than(1));
    }

    #[test]
    fn min_sizes_bound_what_the_writer_emits() {
        // The count checks are only sound if no value is smaller than this.
        for (value, ty) in [
            (Value::Bool(true), ValueType::Bool),
            (Value::String(String::new()), ValueType::String),
            (Value::Array(Array::Array(vec![])), ValueType::Array),
            (Value::F64(0.0), ValueType::F64),
        ] {
            let mut out = Vec::new();
            put_value(&mut out, &value);
            assert_eq!(out.len() as u64, ty.min_size(), "{value:?}");
        }
    }
}
