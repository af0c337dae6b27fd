//! Fitting the cost model's coefficients from a profiler's measurements.
//!
//! The profiler measures; this module fits (so that the model's form and
//! its fit live together):
//! 1. per weight type, matrix products of known bytes at several token
//!    counts (decode batches 1 to 32, prefill chunks): `seconds/bytes =
//!    max(m, n·c)`, fitted by trying every breakpoint between sorted token
//!    counts, with `m` the mean below it and `c` least squares through the
//!    origin above it;
//! 2. whole units at several token counts and context lengths: what the
//!    weights do not explain is fitted as `o + o_n·n + r·A·kv` by least
//!    squares (coefficients that come out negative are dropped and the
//!    rest refitted);
//! 3. storage reads of several sizes: `seconds = latency + bytes/bandwidth`
//!    by least squares.

use std::collections::BTreeMap;

use crate::model::dtype::GgmlType;

use super::device::{ComputeModel, StorageProfile, WeightRate};
use super::model::UnitShape;
use super::PlanError;

/// One timed matrix product of `bytes` of weights of type `dtype` with
/// `tokens` activation vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatmulSample {
    pub dtype: GgmlType,
    pub bytes: u64,
    pub tokens: u32,
    pub seconds: f64,
}

/// One timed run of a whole unit.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitSample {
    pub unit: UnitShape,
    pub tokens: u32,
    /// (query, key) pairs attended.
    pub attended: u64,
    pub seconds: f64,
}

/// One timed cold read from storage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadSample {
    pub bytes: u64,
    pub seconds: f64,
}

fn check(ok: bool, what: &str) -> Result<(), PlanError> {
    if ok {
        Ok(())
    } else {
        Err(PlanError::Fit(what.to_string()))
    }
}

/// Fits `y = max(m, n·c)` to (n, y) points.
fn fit_roofline(mut pts: Vec<(f64, f64)>) -> WeightRate {
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n_max = pts.last().map_or(1.0, |p| p.0);
    let mut best = (
        f64::INFINITY,
        WeightRate {
            s_per_byte: 0.0,
            s_per_byte_token: 0.0,
        },
    );
    for j in 1..=pts.len() {
        let m = pts[..j].iter().map(|p| p.1).sum::<f64>() / j as f64;
        let c = if j < pts.len() {
            let (xy, xx) = pts[j..]
                .iter()
                .fold((0.0, 0.0), |(a, b), p| (a + p.0 * p.1, b + p.0 * p.0));
            xy / xx
        } else {
            // Memory-bound everywhere measured: arithmetic binds no earlier
            // than just past the largest count.
            m / n_max
        };
        let sse: f64 = pts.iter().map(|p| (p.1 - m.max(p.0 * c)).powi(2)).sum();
        if sse < best.0 && m > 0.0 && c > 0.0 {
            best = (
                sse,
                WeightRate {
                    s_per_byte: m,
                    s_per_byte_token: c,
                },
            );
        }
    }
    best.1
}

/// Solves the least-squares problem `min |X·β − y|` for the columns in
/// `cols` (normal equations, Gaussian elimination).
fn least_squares(x: &[[f64; 3]], y: &[f64], cols: &[usize]) -> Option<Vec<f64>> {
    let k = cols.len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for (row, &yi) in x.iter().zip(y) {
        for i in 0..k {
            for j in 0..k {
                a[i][j] += row[cols[i]] * row[cols[j]];
            }
            a[i][k] += row[cols[i]] * yi;
        }
    }
    for i in 0..k {
        let p = (i..k).max_by(|&r, &s| a[r][i].abs().total_cmp(&a[s][i].abs()))?;
        a.swap(i, p);
        if a[i][i].abs() < 1e-300 {
            return None;
        }
        let pivot = a[i].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != i {
                let f = row[i] / pivot[i];
                for (x, p) in row.iter_mut().zip(&pivot).skip(i) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i]).collect())
}

/// Fits a [`ComputeModel`] (module docs, steps 1 and 2).
pub fn fit_compute(
    matmuls: &[MatmulSample],
    units: &[UnitSample],
) -> Result<ComputeModel, PlanError> {
    check(!matmuls.is_empty(), "no matrix-product samples")?;
    check(
        matmuls
            .iter()
            .all(|s| s.bytes > 0 && s.tokens > 0 && s.seconds.is_finite() && s.seconds > 0.0),
        "a matrix-product sample has no bytes, no tokens or a non-positive time",
    )?;
    let mut by_type: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for s in matmuls {
        by_type
            .entry(s.dtype.name())
            .or_default()
            .push((s.tokens as f64, s.seconds / s.bytes as f64));
    }
    let mut weights = BTreeMap::new();
    for (name, pts) in by_type {
        let rate = fit_roofline(pts);
        check(
            rate.s_per_byte > 0.0,
            &format!("no positive fit for {name}"),
        )?;
        weights.insert(name.to_string(), rate);
    }
    let mean_m = weights.values().map(|w| w.s_per_byte).sum::<f64>() / weights.len() as f64;
    let mut model = ComputeModel {
        layer_overhead_s: 0.0,
        per_token_s: 0.0,
        kv_s_per_byte: mean_m,
        weights,
    };
    if units.is_empty() {
        return Ok(model);
    }
    check(
        units
            .iter()
            .all(|s| s.tokens > 0 && s.seconds.is_finite() && s.seconds >= 0.0),
        "a unit sample has no tokens or an impossible time",
    )?;
    let mut x = Vec::with_capacity(units.len());
    let mut y = Vec::with_capacity(units.len());
    for s in units {
        let weights_only = model.unit_seconds(&s.unit, s.tokens, 0).ok_or_else(|| {
            PlanError::Fit("a unit sample has a type with no matrix-product samples".into())
        })?;
        x.push([
            1.0,
            s.tokens as f64,
            s.attended as f64 * s.unit.kv_bytes_per_token as f64,
        ]);
        y.push(s.seconds - weights_only);
    }
    let mut cols = vec![0usize, 1, 2];
    let coef = loop {
        let beta = least_squares(&x, &y, &cols).unwrap_or_else(|| vec![0.0; cols.len()]);
        match beta.iter().position(|&b| b < 0.0) {
            Some(i) => {
                cols.remove(i);
                if cols.is_empty() {
                    break [0.0; 3];
                }
            }
            None => {
                let mut c = [0.0; 3];
                for (i, &col) in cols.iter().enumerate() {
                    c[col] = beta[i];
                }
                break c;
            }
        }
    };
    model.layer_overhead_s = coef[0];
    model.per_token_s = coef[1];
    if coef[2] > 0.0 {
        model.kv_s_per_byte = coef[2];
    }
    Ok(model)
}

/// Fits a [`StorageProfile`] from reads of at least two sizes.
pub fn fit_storage(reads: &[ReadSample]) -> Result<StorageProfile, PlanError> {
    check(
        reads
            .iter()
            .all(|s| s.seconds.is_finite() && s.seconds > 0.0),
        "a read sample has a non-positive time",
    )?;
    let sizes: std::collections::BTreeSet<u64> = reads.iter().map(|s| s.bytes).collect();
    check(sizes.len() >= 2, "reads of at least two sizes are needed")?;
    let x: Vec<[f64; 3]> = reads.iter().map(|s| [1.0, s.bytes as f64, 0.0]).collect();
    let y: Vec<f64> = reads.iter().map(|s| s.seconds).collect();
    let beta = least_squares(&x, &y, &[0, 1])
        .ok_or_else(|| PlanError::Fit("degenerate read samples".into()))?;
    let (latency, slope) = if beta[0] < 0.0 {
        // Through the origin.
        let b = least_squares(&x, &y, &[1])
            .ok_or_else(|| PlanError::Fit("degenerate read samples".into()))?;
        (0.0, b[0])
    } else {
        (beta[0], beta[1])
    };
    check(slope > 0.0, "read time does not grow with size")?;
    Ok(StorageProfile {
        read_bytes_per_s: 1.0 / slope,
        read_latency_s: latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dtype::GgmlType;
    use crate::plan::WeightBytes;

    #[test]
    fn recovers_known_coefficients() {
        let truth = ComputeModel {
            layer_overhead_s: 80e-6,
            per_token_s: 3e-6,
            kv_s_per_byte: 7e-12,
            weights: [(
                "BF16".to_string(),
                WeightRate {
                    s_per_byte: 6e-12,
                    s_per_byte_token: 3e-13,
                },
            )]
            .into_iter()
            .collect(),
        };
        let rate = truth.weights["BF16"];
        let mm: Vec<MatmulSample> = [1u32, 2, 4, 8, 16, 32, 64, 128]
            .iter()
            .map(|&n| MatmulSample {
                dtype: GgmlType::BF16,
                bytes: 1 << 26,
                tokens: n,
                seconds: (1u64 << 26) as f64
                    * rate.s_per_byte.max(n as f64 * rate.s_per_byte_token),
            })
            .collect();
        let unit = UnitShape {
            weights: vec![WeightBytes {
                dtype: GgmlType::BF16,
                bytes: 1 << 27,
            }],
            kv_bytes_per_token: 8192,
        };
        let mut us = Vec::new();
        for n in [1u32, 4, 16, 32] {
            for ctx in [256u64, 1024, 4096] {
                let a = n as u64 * ctx;
                us.push(UnitSample {
                    unit: unit.clone(),
                    tokens: n,
                    attended: a,
                    seconds: truth.unit_seconds(&unit, n, a).unwrap(),
                });
            }
        }
        let fit = fit_compute(&mm, &us).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1e-18);
        assert!(
            close(fit.weights["BF16"].s_per_byte, rate.s_per_byte),
            "{fit:?}"
        );
        assert!(
            close(fit.weights["BF16"].s_per_byte_token, rate.s_per_byte_token),
            "{fit:?}"
        );
        assert!(
            close(fit.layer_overhead_s, truth.layer_overhead_s),
            "{fit:?}"
        );
        assert!(close(fit.per_token_s, truth.per_token_s), "{fit:?}");
        assert!(close(fit.kv_s_per_byte, truth.kv_s_per_byte), "{fit:?}");

        let reads: Vec<ReadSample> = [1u64 << 20, 1 << 24, 1 << 28]
            .iter()
            .map(|&b| ReadSample {
                bytes: b,
                seconds: 1e-4 + b as f64 / 3.5e9,
            })
            .collect();
        let s = fit_storage(&reads).unwrap();
        assert!(
            close(s.read_bytes_per_s, 3.5e9) && close(s.read_latency_s, 1e-4),
            "{s:?}"
        );
        assert!(fit_storage(&reads[..1]).is_err());
    }
}
