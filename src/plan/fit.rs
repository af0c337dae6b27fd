//! Fitting the cost model's coefficients from a profiler's measurements.
//!
//! The profiler measures; this module fits (so that the model's form and
//! its fit live together):
//! 1. per weight type, matrix products of known bytes at several token
//!    counts (decode batches 1 to 32, prefill chunks): `seconds/bytes =
//!    max(m, n·c)`, fitted by trying every breakpoint between sorted token
//!    counts, with `m` the mean below it and `c` least squares through the
//!    origin above it. This fixes each type's knee `n* = m/c`, where
//!    arithmetic starts to bind;
//! 2. whole units at several token counts and context lengths, fitted
//!    jointly as `o + o_n·n + Σ_type m_type·W_type·max(1, n/n*_type) +
//!    r·A·kv` by least squares, each error relative to the mean time of
//!    the samples with the same token count (so that the units that make
//!    most of a step weigh most, and every batch size counts), keeping the
//!    knees of
//!    step 1 (so `c_type = m_type/n*_type`); coefficients that come out
//!    negative are dropped and the rest refitted. The rates come from the
//!    units rather than from the lone products because a product timed
//!    alone is not a product inside a unit: shapes differ (a down
//!    projection's long rows), and so do dispatch and cache state. Types
//!    without unit samples keep the rates of step 1. Last, at each token
//!    count measured, a factor on the weight term makes the fitted times
//!    of the units there add up to the measured ones
//!    ([`ComputeModel::token_factors`]): kernels have favourite and
//!    unfavourite batch sizes that no smooth roofline follows;
//! 3. storage reads of several sizes: `seconds = latency + bytes/bandwidth`
//!    by least squares on the median time of each size.

use std::collections::BTreeMap;

use crate::model::dtype::GgmlType;

use super::device::{seconds_per_byte, ComputeModel, StorageProfile, WeightRate};
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
    /// How much the sample counts: how many units like it a step runs,
    /// shared among the samples that stand for the same units (one
    /// attention unit timed at several contexts). The fit aims at step
    /// totals, in which a layer's units count once per layer and the head
    /// once. 1 when nothing is known.
    pub weight: f64,
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

/// The exponents of the roofline tried by the fit (`None`: the sharp
/// maximum; see [`ComputeModel::roofline_exponent`]).
const EXPONENTS: [Option<f64>; 5] = [None, Some(4.0), Some(2.0), Some(1.5), Some(1.0)];

/// Seconds per byte at `n` tokens of a rate with `m = 1` and knee `knee`.
fn shape(n: f64, knee: f64, p: Option<f64>) -> f64 {
    seconds_per_byte(
        WeightRate {
            s_per_byte: 1.0,
            s_per_byte_token: 1.0 / knee,
        },
        n,
        p,
    )
}

/// Fits `y = m·shape(n / knee)` to (n, y) points by relative least
/// squares: `m` in closed form for each knee, the knee by a search over a
/// log grid refined by golden sections. Returns the rate and the sum of
/// squared relative errors.
fn fit_roofline(pts: &[(f64, f64)], p: Option<f64>) -> (WeightRate, f64) {
    let score = |knee: f64| -> (f64, f64) {
        let (mut a, mut b) = (0.0, 0.0);
        for &(n, y) in pts {
            let g = shape(n, knee, p) / y;
            a += g;
            b += g * g;
        }
        let m = if b > 0.0 { a / b } else { 0.0 };
        let sse = pts
            .iter()
            .map(|&(n, y)| (m * shape(n, knee, p) / y - 1.0).powi(2))
            .sum();
        (sse, m)
    };
    let (lo, hi, steps) = (0.25f64.ln(), 8192f64.ln(), 96);
    let at = |i: usize| (lo + (hi - lo) * i as f64 / steps as f64).exp();
    let best = (0..=steps)
        .min_by(|&i, &j| score(at(i)).0.total_cmp(&score(at(j)).0))
        .unwrap_or(0);
    let (mut a, mut b) = (
        at(best.saturating_sub(1)).ln(),
        at((best + 1).min(steps)).ln(),
    );
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..100 {
        let (x1, x2) = (b - phi * (b - a), a + phi * (b - a));
        if score(x1.exp()).0 <= score(x2.exp()).0 {
            b = x2;
        } else {
            a = x1;
        }
    }
    let mut knee = ((a + b) / 2.0).exp();
    if score(at(best)).0 < score(knee).0 {
        knee = at(best);
    }
    let (sse, m) = score(knee);
    (
        WeightRate {
            s_per_byte: m,
            s_per_byte_token: m / knee,
        },
        sse,
    )
}

/// Solves the least-squares problem `min |X·β − y|` for the columns in
/// `cols` (normal equations, Gaussian elimination with partial pivoting).
fn least_squares(x: &[Vec<f64>], y: &[f64], cols: &[usize]) -> Option<Vec<f64>> {
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
    // Columns differ in scale by many orders of magnitude (seconds per
    // token against seconds per byte): equilibrate before eliminating.
    let scale: Vec<f64> = (0..k)
        .map(|i| {
            let d = a[i][i].sqrt();
            if d > 0.0 {
                1.0 / d
            } else {
                1.0
            }
        })
        .collect();
    for i in 0..k {
        for j in 0..k {
            a[i][j] *= scale[i] * scale[j];
        }
        a[i][k] *= scale[i];
    }
    for i in 0..k {
        let p = (i..k).max_by(|&r, &s| a[r][i].abs().total_cmp(&a[s][i].abs()))?;
        a.swap(i, p);
        if a[i][i].abs() < 1e-12 {
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
    Some((0..k).map(|i| a[i][k] / a[i][i] * scale[i]).collect())
}

/// Least squares with every coefficient non-negative: a column whose
/// coefficient comes out negative is dropped and the rest refitted.
/// Returns one coefficient per column of `x` (0 for dropped ones).
fn non_negative_least_squares(x: &[Vec<f64>], y: &[f64]) -> Vec<f64> {
    let n_cols = x.first().map_or(0, Vec::len);
    let mut cols: Vec<usize> = (0..n_cols)
        .filter(|&c| x.iter().any(|row| row[c] != 0.0))
        .collect();
    loop {
        if cols.is_empty() {
            return vec![0.0; n_cols];
        }
        let beta = match least_squares(x, y, &cols) {
            Some(b) => b,
            None => {
                // Degenerate: drop the last column and try again.
                cols.pop();
                continue;
            }
        };
        match beta.iter().position(|&b| b < 0.0) {
            Some(i) => {
                cols.remove(i);
            }
            None => {
                let mut c = vec![0.0; n_cols];
                for (i, &col) in cols.iter().enumerate() {
                    c[col] = beta[i];
                }
                return c;
            }
        }
    }
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
    check(
        units.iter().all(|s| {
            s.tokens > 0
                && s.seconds.is_finite()
                && s.seconds > 0.0
                && s.weight.is_finite()
                && s.weight > 0.0
        }),
        "a unit sample has no tokens, an impossible time or no weight",
    )?;
    let mut best: Option<(f64, ComputeModel)> = None;
    for p in EXPONENTS {
        let mut weights = BTreeMap::new();
        let mut sse = 0.0;
        for (name, pts) in &by_type {
            let (rate, e) = fit_roofline(pts, p);
            check(
                rate.s_per_byte > 0.0 && rate.s_per_byte_token > 0.0,
                &format!("no positive fit for {name}"),
            )?;
            weights.insert(name.to_string(), rate);
            sse += e;
        }
        let model = ComputeModel {
            layer_overhead_s: 0.0,
            per_token_s: 0.0,
            kv_s_per_byte: weights.values().map(|w| w.s_per_byte).sum::<f64>()
                / weights.len() as f64,
            weights,
            roofline_exponent: p,
            token_factors: BTreeMap::new(),
        };
        let (model, sse) = if units.is_empty() {
            (model, sse)
        } else {
            let model = fit_units(model, units)?;
            let sse = unit_error(&model, units);
            (model, sse)
        };
        if best.as_ref().is_none_or(|(e, _)| sse < *e) {
            best = Some((sse, model));
        }
    }
    let mut model = best.expect("at least one exponent").1;
    model.token_factors = token_factors(&model, units);
    Ok(model)
}

/// The end of step 2 of the module docs: at each token count the units
/// were measured at, the factor on the weight term that makes the fitted
/// times of those units add up to the measured ones.
fn token_factors(model: &ComputeModel, units: &[UnitSample]) -> BTreeMap<u32, f64> {
    // The same model without the weight term.
    let zero = WeightRate {
        s_per_byte: 0.0,
        s_per_byte_token: 0.0,
    };
    let weights_free = ComputeModel {
        weights: model.weights.keys().map(|k| (k.clone(), zero)).collect(),
        ..model.clone()
    };
    let mut sums: BTreeMap<u32, (f64, f64, f64)> = BTreeMap::new();
    for s in units {
        let Some(full) = model.unit_seconds(&s.unit, s.tokens, s.attended) else {
            continue;
        };
        let rest = weights_free
            .unit_seconds(&s.unit, s.tokens, s.attended)
            .unwrap_or(0.0);
        let e = sums.entry(s.tokens).or_default();
        e.0 += s.weight * s.seconds;
        e.1 += s.weight * rest;
        e.2 += s.weight * (full - rest);
    }
    if sums.len() < 2 {
        return BTreeMap::new();
    }
    sums.into_iter()
        .filter(|(_, (_, _, w))| *w > 0.0)
        .map(|(n, (measured, rest, weights))| (n, ((measured - rest) / weights).clamp(0.5, 2.0)))
        .collect()
}

/// Mean time of the unit samples at each token count.
fn mean_by_tokens(units: &[UnitSample]) -> BTreeMap<u32, f64> {
    let mut acc: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    for s in units {
        let e = acc.entry(s.tokens).or_default();
        e.0 += s.weight * s.seconds;
        e.1 += s.weight;
    }
    acc.into_iter()
        .map(|(n, (sum, weight))| (n, sum / weight.max(1e-300)))
        .collect()
}

/// The weighted squared error of `model` on `units` (see [`fit_units`]).
fn unit_error(model: &ComputeModel, units: &[UnitSample]) -> f64 {
    let scale = mean_by_tokens(units);
    units
        .iter()
        .map(|s| {
            let t = model
                .unit_seconds(&s.unit, s.tokens, s.attended)
                .unwrap_or(f64::INFINITY);
            s.weight * ((t - s.seconds) / scale[&s.tokens]).powi(2)
        })
        .sum()
}

/// Step 2 of the module docs: the unit samples refit the per-unit terms
/// and the rates of `model`, keeping its knees and exponent.
fn fit_units(mut model: ComputeModel, units: &[UnitSample]) -> Result<ComputeModel, PlanError> {
    let p = model.roofline_exponent;
    // Columns: o, o_n, r, then m of each type the units use.
    let types: Vec<GgmlType> = {
        let mut t: Vec<GgmlType> = units
            .iter()
            .flat_map(|s| s.unit.weights.iter().map(|w| w.dtype))
            .collect();
        t.sort_by_key(|d| d.name());
        t.dedup();
        t
    };
    let knees: Vec<f64> = types
        .iter()
        .map(|&t| {
            let rate = model.rate(t).ok_or_else(|| {
                PlanError::Fit(format!(
                    "a unit sample has weights of type {t} with no matrix-product samples"
                ))
            })?;
            Ok(rate.s_per_byte / rate.s_per_byte_token)
        })
        .collect::<Result<_, PlanError>>()?;
    // Each sample's error counts relative to the mean time of the samples
    // with its token count: within a token count, large units (which make
    // most of a step) weigh more; across token counts, a batch of 1 weighs
    // as much as a prefill chunk.
    let mean_at = mean_by_tokens(units);
    let mut x = Vec::with_capacity(units.len());
    let mut y = Vec::with_capacity(units.len());
    for s in units {
        let scale = mean_at[&s.tokens];
        let n = s.tokens as f64;
        let mut row = vec![1.0, n, s.attended as f64 * s.unit.kv_bytes_per_token as f64];
        for (&t, &knee) in types.iter().zip(&knees) {
            let bytes: u64 = s
                .unit
                .weights
                .iter()
                .filter(|w| w.dtype == t)
                .map(|w| w.bytes)
                .sum();
            row.push(bytes as f64 * shape(n, knee, p));
        }
        let w = s.weight.sqrt() / scale;
        x.push(row.iter().map(|v| v * w).collect::<Vec<f64>>());
        y.push(s.seconds * w);
    }
    let coef = non_negative_least_squares(&x, &y);
    model.layer_overhead_s = coef[0];
    model.per_token_s = coef[1];
    if coef[2] > 0.0 {
        model.kv_s_per_byte = coef[2];
    }
    for (i, &t) in types.iter().enumerate() {
        let m = coef[3 + i];
        if m > 0.0 {
            let k = knees[i];
            model.weights.insert(
                t.name().to_string(),
                WeightRate {
                    s_per_byte: m,
                    s_per_byte_token: m / k,
                },
            );
        }
    }
    Ok(model)
}

/// Fits a [`StorageProfile`] from reads of at least two sizes: the median
/// time of each size (a read disturbed by other programs is an outlier,
/// not a trend), then `latency + bytes/bandwidth` by least squares on
/// relative errors, so that small reads, which fix the latency, count as
/// much as large ones.
pub fn fit_storage(reads: &[ReadSample]) -> Result<StorageProfile, PlanError> {
    check(
        reads
            .iter()
            .all(|s| s.seconds.is_finite() && s.seconds > 0.0 && s.bytes > 0),
        "a read sample has no bytes or a non-positive time",
    )?;
    let mut by_size: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for s in reads {
        by_size.entry(s.bytes).or_default().push(s.seconds);
    }
    check(by_size.len() >= 2, "reads of at least two sizes are needed")?;
    let mut x = Vec::with_capacity(by_size.len());
    let mut y = Vec::with_capacity(by_size.len());
    for (bytes, mut times) in by_size {
        times.sort_by(f64::total_cmp);
        let n = times.len();
        let median = if n % 2 == 1 {
            times[n / 2]
        } else {
            (times[n / 2 - 1] + times[n / 2]) / 2.0
        };
        x.push(vec![1.0 / median, bytes as f64 / median]);
        y.push(1.0);
    }
    let beta = non_negative_least_squares(&x, &y);
    let (latency, slope) = (beta[0], beta[1]);
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
            roofline_exponent: None,
            token_factors: BTreeMap::new(),
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
                    weight: 1.0,
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
