//! Frames on QUIC streams (DESIGN.md §7): a length prefix, a kind, then
//! either a small postcard control message or a tensor with a fixed
//! little-endian header and raw f32 data.
//!
//! ```text
//! u32 length of what follows (LE)
//! u8  kind: 1 control, 2 tensor
//! control: postcard bytes
//! tensor:  u8 dtype (0 = f32), u8 ndims (1..=4), u8 0, u8 0,
//!          u64 plan epoch, u64 request id, u32 position, u16 window, u16 0,
//!          u32 dims[4] (unused dims 0), then product(dims) f32 values
//! ```
//!
//! Nothing in a frame is pointer-like: no offsets, buffer ids or op codes.
//! Every frame is validated before it is used (size against the limits
//! before anything is allocated, known kind and dtype, reserved bytes zero,
//! dims product equal to the payload, the plan epoch); a bad frame is a
//! [`FrameError`] whose [`FrameError::code`] resets that stream.

use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

pub const KIND_CONTROL: u8 = 1;
pub const KIND_TENSOR: u8 = 2;
pub const DTYPE_F32: u8 = 0;
/// Bytes of a tensor header after the kind byte.
pub const TENSOR_HEADER: usize = 44;
pub const MAX_DIMS: usize = 4;

/// Largest frames accepted, in bytes after the length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    pub max_control: usize,
    pub max_tensor: usize,
}

impl Default for FrameLimits {
    /// 1 MiB of control (a plan), 16 MiB of tensor (a 512-token prefill
    /// chunk of hidden size 8192).
    fn default() -> Self {
        FrameLimits {
            max_control: 1 << 20,
            max_tensor: 16 << 20,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("tensor frame: {0}")]
    BadTensor(String),
    #[error("tensor frame of plan epoch {got}, expected {want}")]
    WrongEpoch { got: u64, want: u64 },
    #[error("control message does not decode: {0}")]
    Decode(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("frame not received in time")]
    Timeout,
    #[error("stream: {0}")]
    Stream(String),
}

impl FrameError {
    /// The application error code a stream is reset with.
    pub fn code(&self) -> u32 {
        match self {
            FrameError::TooLarge { .. } => 1,
            FrameError::Empty | FrameError::UnknownKind(_) => 2,
            FrameError::BadTensor(_) => 3,
            FrameError::WrongEpoch { .. } => 4,
            FrameError::Decode(_) => 5,
            FrameError::Timeout => 6,
            FrameError::Truncated | FrameError::Stream(_) => 7,
        }
    }
}

/// The fixed header of a tensor frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorHeader {
    pub epoch: u64,
    pub request: u64,
    pub position: u32,
    pub window: u16,
    /// Used dims first; `ndims` of them are non-zero.
    pub dims: [u32; MAX_DIMS],
    pub ndims: u8,
}

impl TensorHeader {
    /// The number of f32 values, checked against the limit in bytes.
    pub fn elements(&self, limits: &FrameLimits) -> Result<usize, FrameError> {
        let bad = |m: String| FrameError::BadTensor(m);
        let n = self.ndims as usize;
        if n == 0 || n > MAX_DIMS {
            return Err(bad(format!("{n} dims, expected 1 to {MAX_DIMS}")));
        }
        let (used, unused) = self.dims.split_at(n);
        if used.contains(&0) || unused.iter().any(|&d| d != 0) {
            return Err(bad(format!("dims {:?} with ndims {n}", self.dims)));
        }
        let mut count: usize = 1;
        for &d in used {
            count = count
                .checked_mul(d as usize)
                .ok_or_else(|| bad(format!("dims {:?} overflow", self.dims)))?;
        }
        let bytes = count
            .checked_mul(4)
            .and_then(|b| b.checked_add(1 + TENSOR_HEADER))
            .ok_or_else(|| bad(format!("dims {:?} overflow", self.dims)))?;
        if bytes > limits.max_tensor {
            return Err(FrameError::TooLarge {
                len: bytes,
                max: limits.max_tensor,
            });
        }
        Ok(count)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[DTYPE_F32, self.ndims, 0, 0]);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.request.to_le_bytes());
        out.extend_from_slice(&self.position.to_le_bytes());
        out.extend_from_slice(&self.window.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        for d in self.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
    }

    /// Parses and validates the header bytes after the kind byte.
    pub fn decode(b: &[u8; TENSOR_HEADER]) -> Result<TensorHeader, FrameError> {
        if b[0] != DTYPE_F32 {
            return Err(FrameError::BadTensor(format!("dtype {}", b[0])));
        }
        if b[2] != 0 || b[3] != 0 || b[26] != 0 || b[27] != 0 {
            return Err(FrameError::BadTensor("reserved bytes are not zero".into()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let mut dims = [0u32; MAX_DIMS];
        for (k, d) in dims.iter_mut().enumerate() {
            *d = u32_at(28 + 4 * k);
        }
        Ok(TensorHeader {
            ndims: b[1],
            epoch: u64_at(4),
            request: u64_at(12),
            position: u32_at(20),
            window: u16::from_le_bytes([b[24], b[25]]),
            dims,
        })
    }
}

// dtype, ndims, 2 reserved; epoch; request; position; window, 2 reserved;
// dims: the layout `encode` writes and `decode` reads.
const _: () = assert!(TENSOR_HEADER == 4 + 8 + 8 + 4 + 4 + 4 * MAX_DIMS);

/// A tensor frame: header and values.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorFrame {
    pub header: TensorHeader,
    pub data: Vec<f32>,
}

/// A validated frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// Postcard bytes; see [`Frame::control`].
    Control(Vec<u8>),
    Tensor(TensorFrame),
}

impl Frame {
    /// Decodes a control frame's message.
    pub fn control<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        match self {
            Frame::Control(b) => {
                postcard::from_bytes(b).map_err(|e| FrameError::Decode(e.to_string()))
            }
            Frame::Tensor(_) => Err(FrameError::Decode("a tensor frame, not control".into())),
        }
    }
}

/// A control frame, length prefix included.
pub fn encode_control<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
    let len = u32::try_from(body.len() + 1).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(5 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.push(KIND_CONTROL);
    out.extend_from_slice(&body);
    Ok(out)
}

/// A tensor frame, length prefix included. The data length must match the
/// dims.
pub fn encode_tensor(t: &TensorFrame) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_tensor_into(&t.header, &t.data, &mut out)?;
    Ok(out)
}

/// Appends a tensor frame (length prefix included) made of `header` and
/// `data` to `out`, without first gathering the values into a
/// [`TensorFrame`]: the ring sends slices of its activations this way.
pub fn encode_tensor_into(
    header: &TensorHeader,
    data: &[f32],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let unlimited = FrameLimits {
        max_control: usize::MAX,
        max_tensor: usize::MAX,
    };
    let n = header.elements(&unlimited)?;
    if n != data.len() {
        return Err(FrameError::BadTensor(format!(
            "{} values for dims {:?}",
            data.len(),
            header.dims
        )));
    }
    let len = u32::try_from(1 + TENSOR_HEADER + 4 * n).map_err(|_| FrameError::TooLarge {
        len: 4 * n,
        max: u32::MAX as usize,
    })?;
    out.reserve(4 + len as usize);
    out.extend_from_slice(&len.to_le_bytes());
    out.push(KIND_TENSOR);
    header.encode(out);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// Checks a frame's declared length and kind before its body is read.
pub fn check_length(len: usize, kind: u8, limits: &FrameLimits) -> Result<(), FrameError> {
    let max = match kind {
        KIND_CONTROL => limits.max_control,
        KIND_TENSOR => limits.max_tensor,
        k => return Err(FrameError::UnknownKind(k)),
    };
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    if kind == KIND_TENSOR && len < 1 + TENSOR_HEADER {
        return Err(FrameError::BadTensor(format!(
            "{len} bytes, shorter than a header"
        )));
    }
    Ok(())
}

/// Checks a tensor header against the frame length and the plan epoch.
pub fn check_tensor(
    h: &TensorHeader,
    len: usize,
    limits: &FrameLimits,
    epoch: Option<u64>,
) -> Result<usize, FrameError> {
    let n = h.elements(limits)?;
    if 1 + TENSOR_HEADER + 4 * n != len {
        return Err(FrameError::BadTensor(format!(
            "dims {:?} need {} bytes of data, the frame has {}",
            &h.dims[..h.ndims as usize],
            4 * n,
            len - 1 - TENSOR_HEADER
        )));
    }
    if let Some(want) = epoch {
        if h.epoch != want {
            return Err(FrameError::WrongEpoch { got: h.epoch, want });
        }
    }
    Ok(n)
}

/// Decodes one whole frame held in memory (length prefix included); the
/// same checks as the stream reader. For tests and fuzzing.
pub fn decode(bytes: &[u8], limits: &FrameLimits, epoch: Option<u64>) -> Result<Frame, FrameError> {
    let (len, rest) = bytes.split_at_checked(4).ok_or(FrameError::Truncated)?;
    let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let kind = *rest.first().ok_or(FrameError::Truncated)?;
    check_length(len, kind, limits)?;
    if rest.len() != len {
        return Err(if rest.len() < len {
            FrameError::Truncated
        } else {
            FrameError::BadTensor("bytes after the frame".into())
        });
    }
    let body = &rest[1..];
    match kind {
        KIND_CONTROL => Ok(Frame::Control(body.to_vec())),
        _ => {
            let header: &[u8; TENSOR_HEADER] =
                body[..TENSOR_HEADER].try_into().expect("checked length");
            let h = TensorHeader::decode(header)?;
            check_tensor(&h, len, limits, epoch)?;
            let data = body[TENSOR_HEADER..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Ok(Frame::Tensor(TensorFrame { header: h, data }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dims: &[u32]) -> TensorFrame {
        let mut d = [0u32; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        let n: u32 = dims.iter().product();
        TensorFrame {
            header: TensorHeader {
                epoch: 7,
                request: 99,
                position: 12,
                window: 3,
                dims: d,
                ndims: dims.len() as u8,
            },
            data: (0..n).map(|i| i as f32 * 0.5 - 3.0).collect(),
        }
    }

    #[test]
    fn frames_round_trip() {
        let l = FrameLimits::default();
        let t = tensor(&[2, 3, 4]);
        let bytes = encode_tensor(&t).unwrap();
        assert_eq!(bytes.len(), 4 + 1 + TENSOR_HEADER + 24 * 4);
        assert_eq!(decode(&bytes, &l, Some(7)).unwrap(), Frame::Tensor(t));
        let c = encode_control(&(1u8, "plan".to_string())).unwrap();
        let f = decode(&c, &l, None).unwrap();
        assert_eq!(
            f.control::<(u8, String)>().unwrap(),
            (1, "plan".to_string())
        );
    }

    #[test]
    fn every_malformed_frame_is_a_named_error() {
        let l = FrameLimits::default();
        let good = encode_tensor(&tensor(&[4, 4])).unwrap();
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            b
        };
        let set_dim = |k: usize, v: u32| {
            let mut b = good.clone();
            b[4 + 1 + 28 + 4 * k..4 + 1 + 32 + 4 * k].copy_from_slice(&v.to_le_bytes());
            b
        };
        assert_eq!(
            decode(&with(4, 9), &l, None),
            Err(FrameError::UnknownKind(9))
        );
        assert!(matches!(
            decode(&with(5, 1), &l, None),
            Err(FrameError::BadTensor(_))
        )); // dtype
        assert!(matches!(
            decode(&with(6, 0), &l, None),
            Err(FrameError::BadTensor(_))
        )); // ndims 0
        assert!(matches!(
            decode(&with(6, 5), &l, None),
            Err(FrameError::BadTensor(_))
        )); // ndims 5
        assert!(matches!(
            decode(&with(7, 1), &l, None),
            Err(FrameError::BadTensor(_))
        )); // reserved
        assert!(matches!(
            decode(&with(5 + 27, 1), &l, None),
            Err(FrameError::BadTensor(_))
        )); // reserved
        assert!(matches!(
            decode(&set_dim(1, 5), &l, None),
            Err(FrameError::BadTensor(_))
        )); // 4x5 != 16
        assert!(matches!(
            decode(&set_dim(2, 1), &l, None),
            Err(FrameError::BadTensor(_))
        )); // unused dim
        assert!(matches!(
            decode(&set_dim(1, 0), &l, None),
            Err(FrameError::BadTensor(_))
        )); // zero dim
        assert!(matches!(
            decode(&set_dim(0, u32::MAX), &l, None),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(
            decode(&good, &l, Some(8)),
            Err(FrameError::WrongEpoch { got: 7, want: 8 })
        );
        assert_eq!(
            decode(&good[..good.len() - 1], &l, None),
            Err(FrameError::Truncated)
        );
        assert_eq!(decode(&[0, 0, 0, 0], &l, None), Err(FrameError::Empty));
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&huge, &l, None),
            Err(FrameError::TooLarge { .. })
        ));
        // Every truncation and every single-byte change: an error or a
        // valid frame, never a panic.
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], &l, None).is_err());
        }
        for at in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let _ = decode(&with(at, v), &l, Some(7));
            }
        }
    }
}
