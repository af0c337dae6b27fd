//! The CUDA sources of `kernels/`, embedded in the binary, and the
//! compilation units NVRTC gets.
//!
//! NVRTC is given one string per unit and no include path, so a unit is its
//! headers followed by its `.cu` file, each preceded by a `#line` directive
//! so that NVRTC's log names the real file and line.

use sha2::{Digest, Sha256};

use crate::model::dtype::GgmlType;

/// A header shared by units.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub file: &'static str,
    pub text: &'static str,
}

/// One compilation unit: a `.cu` file of `kernels/` and the headers it needs.
#[derive(Clone, Copy, Debug)]
pub struct Unit {
    /// The file name in `kernels/`.
    pub file: &'static str,
    pub headers: &'static [Header],
    pub text: &'static str,
}

pub const COMMON: Header = Header {
    file: "common.cuh",
    text: include_str!("../../../kernels/common.cuh"),
};

pub const DEQUANT: Header = Header {
    file: "dequant.cuh",
    text: include_str!("../../../kernels/dequant.cuh"),
};

/// Matrix products and row lookups on every block format.
pub const MATMUL: Unit = Unit {
    file: "matmul.cu",
    headers: &[COMMON, DEQUANT],
    text: include_str!("../../../kernels/matmul.cu"),
};

/// RMSNorm, RoPE, SwiGLU, the KV store and attention.
pub const OPS: Unit = Unit {
    file: "ops.cu",
    headers: &[COMMON],
    text: include_str!("../../../kernels/ops.cu"),
};

/// Every unit; a test checks that it names every `.cu` file of `kernels/`.
pub const UNITS: [Unit; 2] = [MATMUL, OPS];

/// Every header; a test checks that it names every `.cuh` file.
pub const HEADERS: [Header; 2] = [COMMON, DEQUANT];

impl Unit {
    /// The source NVRTC compiles: headers, then the file, each with `#line`.
    pub fn source(&self) -> String {
        let mut s = String::new();
        for h in self.headers {
            s.push_str(&format!("#line 1 \"{}\"\n{}\n", h.file, h.text));
        }
        s.push_str(&format!("#line 1 \"{}\"\n{}\n", self.file, self.text));
        s
    }

    /// The unit's name without `.cu`.
    pub fn name(&self) -> &'static str {
        self.file.trim_end_matches(".cu")
    }
}

/// A unit made from any source text (a test's broken kernel, say), with the
/// common header.
pub fn custom_source(file: &str, text: &str) -> String {
    format!(
        "#line 1 \"{}\"\n{}\n#line 1 \"{file}\"\n{text}\n",
        COMMON.file, COMMON.text
    )
}

/// Hex SHA-256 of `parts`, each length-prefixed: the PTX cache key.
pub fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// The suffix of the kernels for weights of `ty` (`matvec_q4_k`, ...).
pub fn format_suffix(ty: GgmlType) -> &'static str {
    use GgmlType::*;
    match ty {
        F32 => "f32",
        F16 => "f16",
        BF16 => "bf16",
        Q4_0 => "q4_0",
        Q4_1 => "q4_1",
        Q5_0 => "q5_0",
        Q5_1 => "q5_1",
        Q8_0 => "q8_0",
        Q2_K => "q2_k",
        Q3_K => "q3_k",
        Q4_K => "q4_k",
        Q5_K => "q5_k",
        Q6_K => "q6_k",
        IQ4_NL => "iq4_nl",
        IQ4_XS => "iq4_xs",
    }
}

/// Every kernel entry point each unit must define, for the checks on PTX.
pub fn entry_points(unit: &Unit) -> Vec<String> {
    match unit.file {
        "matmul.cu" => GgmlType::ALL
            .iter()
            .flat_map(|&t| {
                let s = format_suffix(t);
                [
                    format!("matvec_{s}"),
                    format!("matmul_{s}"),
                    format!("rows_{s}"),
                ]
            })
            .collect(),
        "ops.cu" => ["rmsnorm", "rope", "swiglu", "kv_store", "attention"]
            .map(String::from)
            .to_vec(),
        _ => Vec::new(),
    }
}
