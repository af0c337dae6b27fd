//! The GGUF reader on arbitrary bytes: it must return an error or a file
//! whose every tensor slice is in bounds, never panic, hang or over-allocate.
//! An accepted file must also survive a trip through the writer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use loip::model::gguf::{Gguf, GgufWriter};

fuzz_target!(|data: &[u8]| {
    let g = match Gguf::from_bytes(data.to_vec()) {
        Ok(g) => g,
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
            return;
        }
    };
    touch_metadata(&g);
    touch_tensors(&g);

    // writer(reader(x)) is accepted, and re-encoding it changes nothing.
    let bytes = rewrite(&g)
        .to_bytes()
        .expect("writer refuses what the reader accepted");
    let again = Gguf::from_bytes(bytes.clone()).expect("reader refuses what the writer wrote");
    let bytes2 = rewrite(&again).to_bytes().expect("second rewrite");
    assert!(bytes == bytes2, "re-encoding is not idempotent");
});

fn touch_metadata(g: &Gguf) {
    let m = g.metadata();
    for (key, value) in m.iter() {
        assert!(std::ptr::eq(m.get(key).expect("indexed"), value));
        let _ = m.get_u32(key);
        let _ = m.get_u64(key);
        let _ = m.get_f32(key);
        let _ = m.get_bool(key);
        let _ = m.get_str(key);
        let _ = m.get_str_array(key);
        let _ = m.get_i32_array(key);
        let _ = m.get_f32_array(key);
    }
}

fn touch_tensors(g: &Gguf) {
    let mut sum = 0u64;
    for t in g.tensors() {
        assert!(std::ptr::eq(g.tensor(&t.name).expect("indexed"), t));
        assert_eq!(t.offset % g.alignment(), 0);
        assert_eq!(t.n_rows() * t.row_bytes(), t.size);
        let data = g.tensor_data(t);
        assert_eq!(data.len() as u64, t.size);
        sum = data.iter().fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
    }
    std::hint::black_box(sum);
}

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
