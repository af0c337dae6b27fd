//! Block formats: sizes, exact dequantization against the reference vectors
//! in `fixtures/dtypes/`, length errors, random blocks and the reference dot.

use std::path::PathBuf;

use loip::model::dtype::*;

/// `$LOIP_FIXTURES`, else `shared/fixtures` beside the repository. The
/// fixtures are required: a missing directory fails the test.
fn fixtures_dir() -> PathBuf {
    let dir = match std::env::var_os("LOIP_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"),
    };
    assert!(
        dir.join("dtypes").is_dir(),
        "fixtures not found at {}: set LOIP_FIXTURES or check out shared/ beside the repository",
        dir.display()
    );
    dir
}

/// (raw blocks, expected values) of the fixture for `ty`.
fn fixture(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let dir = fixtures_dir().join("dtypes");
    let read = |ext: &str| {
        let p = dir.join(format!("{}.{ext}", ty.name()));
        std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
    };
    let bin = read("bin");
    let f32_bytes = read("f32");
    assert_eq!(f32_bytes.len() % 4, 0, "{ty}.f32 is not whole f32s");
    let expected: Vec<f32> = f32_bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (bin, expected)
}

fn assert_bits_eq(ty: GgmlType, what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{ty} {what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{ty} {what}: {} of {} values differ; first at {i}: got {:e} ({:#010x}), want {:e} ({:#010x})",
            bad.len(),
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits(),
        );
    }
}

/// All three paths (row, per-block dispatch, typed blocks) reproduce the
/// fixture bit for bit.
fn check_fixture<B: Block>() {
    let ty = B::TYPE;
    let (bin, want) = fixture(ty);
    assert_eq!(
        ty.row_bytes(want.len() as u64),
        Some(bin.len() as u64),
        "{ty}: fixture sizes disagree"
    );

    let got = dequantize_to_vec(ty, &bin, want.len()).unwrap();
    assert_bits_eq(ty, "dequantize_row", &got, &want);

    let mut got = vec![0f32; want.len()];
    for (blk, out) in bin
        .chunks_exact(ty.type_size())
        .zip(got.chunks_exact_mut(ty.block_size()))
    {
        dequantize_block(ty, blk, out);
    }
    assert_bits_eq(ty, "dequantize_block", &got, &want);

    let blocks: &[B] = view_blocks(&bin).unwrap();
    let mut got = vec![0f32; want.len()];
    for (b, out) in blocks.iter().zip(got.chunks_exact_mut(B::ELEMS)) {
        b.dequantize_to(out);
    }
    assert_bits_eq(ty, "Block::dequantize_to", &got, &want);
}

macro_rules! fixture_tests {
    ($($name:ident: $B:ty,)*) => {$(
        #[test]
        fn $name() {
            check_fixture::<$B>();
        }
    )*};
}

fixture_tests! {
    dequant_f32_matches_fixture: BlockF32,
    dequant_f16_matches_fixture: BlockF16,
    dequant_bf16_matches_fixture: BlockBF16,
    dequant_q4_0_matches_fixture: BlockQ4_0,
    dequant_q4_1_matches_fixture: BlockQ4_1,
    dequant_q5_0_matches_fixture: BlockQ5_0,
    dequant_q5_1_matches_fixture: BlockQ5_1,
    dequant_q8_0_matches_fixture: BlockQ8_0,
    dequant_q2_k_matches_fixture: BlockQ2K,
    dequant_q3_k_matches_fixture: BlockQ3K,
    dequant_q4_k_matches_fixture: BlockQ4K,
    dequant_q5_k_matches_fixture: BlockQ5K,
    dequant_q6_k_matches_fixture: BlockQ6K,
    dequant_iq4_nl_matches_fixture: BlockIQ4NL,
    dequant_iq4_xs_matches_fixture: BlockIQ4XS,
}

fn check_layout<B: Block>() {
    let ty = B::TYPE;
    assert_eq!(size_of::<B>(), ty.type_size(), "{ty}: size_of");
    assert_eq!(align_of::<B>(), 1, "{ty}: alignment");
    assert_eq!(B::ELEMS, ty.block_size(), "{ty}: elements");
}

#[test]
fn block_structs_match_type_table() {
    check_layout::<BlockF32>();
    check_layout::<BlockF16>();
    check_layout::<BlockBF16>();
    check_layout::<BlockQ4_0>();
    check_layout::<BlockQ4_1>();
    check_layout::<BlockQ5_0>();
    check_layout::<BlockQ5_1>();
    check_layout::<BlockQ8_0>();
    check_layout::<BlockQ2K>();
    check_layout::<BlockQ3K>();
    check_layout::<BlockQ4K>();
    check_layout::<BlockQ5K>();
    check_layout::<BlockQ6K>();
    check_layout::<BlockIQ4NL>();
    check_layout::<BlockIQ4XS>();
    assert_eq!(GgmlType::Q4_K.bits_per_weight(), 4.5);
    assert_eq!(GgmlType::Q6_K.bits_per_weight(), 6.5625);
}

#[test]
fn unaligned_bytes_view_as_blocks() {
    let ty = GgmlType::Q4_K;
    let raw = random_blocks(ty, 3, 7);
    let mut shifted = vec![0u8; raw.len() + 1];
    shifted[1..].copy_from_slice(&raw);
    let want = dequantize_to_vec(ty, &raw, 3 * QK_K).unwrap();
    let got = dequantize_to_vec(ty, &shifted[1..], 3 * QK_K).unwrap();
    assert_bits_eq(ty, "unaligned", &got, &want);
    assert_eq!(view_blocks::<BlockQ4K>(&shifted[1..]).unwrap().len(), 3);
}

#[test]
fn row_length_errors() {
    let ty = GgmlType::Q4_K;
    let src = random_blocks(ty, 2, 1);

    // dst not a whole number of blocks
    let mut dst = vec![0f32; 300];
    assert_eq!(
        dequantize_row(ty, &src, &mut dst),
        Err(DtypeError::PartialBlock {
            ty,
            n: 300,
            block_size: 256
        })
    );
    // src one byte short, one block short, one byte long
    let mut dst = vec![0f32; 512];
    for bad in [&src[..287], &src[..144]] {
        assert_eq!(
            dequantize_row(ty, bad, &mut dst),
            Err(DtypeError::ByteLength {
                ty,
                n: 512,
                expected: 288,
                got: bad.len()
            })
        );
    }
    let mut long = src.clone();
    long.push(0);
    assert!(matches!(
        dequantize_row(ty, &long, &mut dst),
        Err(DtypeError::ByteLength { got: 289, .. })
    ));
    assert!(dequantize_row(ty, &src, &mut dst).is_ok());

    // to_vec checks before allocating, even for absurd counts
    assert!(matches!(
        dequantize_to_vec(ty, &src, usize::MAX / 2 / 256 * 256),
        Err(DtypeError::TooLarge { .. }) | Err(DtypeError::ByteLength { .. })
    ));
    assert!(matches!(
        dequantize_to_vec(GgmlType::Q8_0, &[0u8; 34], 31),
        Err(DtypeError::PartialBlock { .. })
    ));
    assert_eq!(
        view_blocks::<BlockQ8_0>(&[0u8; 35]).unwrap_err(),
        DtypeError::PartialBlockBytes {
            ty: GgmlType::Q8_0,
            bytes: 35,
            type_size: 34
        }
    );
    // empty rows are fine
    assert_eq!(dequantize_to_vec(ty, &[], 0), Ok(vec![]));
    // the message names the type and the lengths
    let msg = dequantize_row(ty, &src[..10], &mut dst)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("Q4_K") && msg.contains("288") && msg.contains("10"),
        "{msg}"
    );
}

#[test]
#[should_panic(expected = "Q6_K")]
fn dequantize_block_checks_lengths() {
    let blk = random_blocks(GgmlType::Q6_K, 1, 0);
    let mut out = [0f32; 255];
    dequantize_block(GgmlType::Q6_K, &blk, &mut out);
}

#[test]
fn random_blocks_are_finite_and_deterministic() {
    for ty in GgmlType::ALL {
        let n_blocks = 512 / ty.block_size() + 64;
        let a = random_blocks(ty, n_blocks, 42);
        assert_eq!(a.len(), n_blocks * ty.type_size(), "{ty}");
        assert_eq!(
            a,
            random_blocks(ty, n_blocks, 42),
            "{ty}: not deterministic"
        );
        assert_ne!(a, random_blocks(ty, n_blocks, 43), "{ty}: seed ignored");
        let v = dequantize_to_vec(ty, &a, n_blocks * ty.block_size()).unwrap();
        assert!(
            v.iter().all(|x| x.is_finite() && x.abs() < 512.0),
            "{ty}: {v:?}"
        );
        assert!(v.iter().any(|&x| x != 0.0), "{ty}: all zero");
    }
}

#[test]
fn vec_dot_ref_matches_naive_dot() {
    let mut rng = SplitMix64::new(9);
    for ty in GgmlType::ALL {
        let n = 4 * QK_K;
        let row = random_blocks(ty, n / ty.block_size(), ty.id() as u64);
        let x: Vec<f32> = (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect();
        let w = dequantize_to_vec(ty, &row, n).unwrap();
        let naive: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let scale: f64 = w
            .iter()
            .zip(&x)
            .map(|(&a, &b)| (a as f64 * b as f64).abs())
            .sum();
        let got = vec_dot_ref(ty, &row, &x);
        assert!(
            (got as f64 - naive).abs() <= 1e-6 * scale + f64::MIN_POSITIVE,
            "{ty}: vec_dot_ref {got} vs naive {naive}"
        );
    }
}

/// The documented "exact fused forms" reproduce the reference bit for bit:
/// one FMA for the types with a rounding, any float association for the exact
/// ones; integer pre-multiplication differs at most in the sign of a zero.
#[test]
fn fused_forms_match_reference() {
    let n_blocks = 64;
    let check = |ty: GgmlType, form: &dyn Fn(&[u8], usize) -> f32, exact_zero_sign: bool| {
        let raw = random_blocks(ty, n_blocks, 5);
        let want = dequantize_to_vec(ty, &raw, n_blocks * ty.block_size()).unwrap();
        for (b, blk) in raw.chunks_exact(ty.type_size()).enumerate() {
            for e in 0..ty.block_size() {
                let (g, w) = (form(blk, e), want[b * ty.block_size() + e]);
                if exact_zero_sign || w != 0.0 {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{ty} block {b} elem {e}: {g} vs {w}"
                    );
                } else {
                    assert_eq!(g, w, "{ty} block {b} elem {e}");
                }
            }
        }
    };
    let view = |b: &[u8]| *bytemuck::from_bytes::<BlockQ4_1>(b);
    check(
        GgmlType::Q4_1,
        &|b, e| {
            let b = view(b);
            let q = (b.qs[e % 16] >> (4 * (e / 16))) & 15;
            (q as f32).mul_add(b.d.to_f32(), b.m.to_f32())
        },
        true,
    );
    check(
        GgmlType::Q5_1,
        &|b, e| {
            let b: &BlockQ5_1 = bytemuck::from_bytes(b);
            (b.code(e) as f32).mul_add(b.d.to_f32(), b.m.to_f32())
        },
        true,
    );
    check(
        GgmlType::Q2_K,
        &|b, e| {
            let b: &BlockQ2K = bytemuck::from_bytes(b);
            let (sc, mn) = b.scale_min(e / 16);
            (b.d.to_f32() * sc as f32).mul_add(b.code(e) as f32, -(b.dmin.to_f32() * mn as f32))
        },
        true,
    );
    check(
        GgmlType::Q4_K,
        &|b, e| {
            let b: &BlockQ4K = bytemuck::from_bytes(b);
            let (sc, mn) = b.scale_min(e / 32);
            (b.d.to_f32() * sc as f32).mul_add(b.code(e) as f32, -(b.dmin.to_f32() * mn as f32))
        },
        true,
    );
    check(
        GgmlType::Q5_K,
        &|b, e| {
            let b: &BlockQ5K = bytemuck::from_bytes(b);
            let (sc, mn) = b.scale_min(e / 32);
            (b.d.to_f32() * sc as f32).mul_add(b.code(e) as f32, -(b.dmin.to_f32() * mn as f32))
        },
        true,
    );
    // Exact types: the other float association gives the same bits ...
    check(
        GgmlType::Q3_K,
        &|b, e| {
            let b: &BlockQ3K = bytemuck::from_bytes(b);
            b.d.to_f32() * (b.sub_scales()[e / 16] as f32 * b.code(e) as f32)
        },
        true,
    );
    check(
        GgmlType::Q6_K,
        &|b, e| {
            let b: &BlockQ6K = bytemuck::from_bytes(b);
            b.d.to_f32() * (b.scales[e / 16] as f32 * b.code(e) as f32)
        },
        true,
    );
    check(
        GgmlType::IQ4_XS,
        &|b, e| {
            let b: &BlockIQ4XS = bytemuck::from_bytes(b);
            let kv = KVALUES_IQ4NL[b.code(e) as usize];
            b.d.to_f32() * (b.sub_scale(e / 32) as f32 * kv as f32)
        },
        true,
    );
    // ... and integer pre-multiplication the same values (zero signs aside).
    check(
        GgmlType::Q6_K,
        &|b, e| {
            let b: &BlockQ6K = bytemuck::from_bytes(b);
            b.d.to_f32() * (b.scales[e / 16] as i32 * b.code(e) as i32) as f32
        },
        false,
    );
}
