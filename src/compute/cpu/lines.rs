//! f32 buffers that start on a cache line.
//!
//! A 16-lane load from an address that is not a multiple of 64 spans two
//! cache lines and costs two loads. The global allocator gives a `Vec<f32>`
//! 16 bytes of alignment (a large one comes from mmap at a page plus 16), so
//! every activation load of a batched product was split in two, and prefill
//! took a third longer (`loip bench`). The crates that align vectors add a
//! dependency for what a 64-byte element type and bytemuck already give.

use bytemuck::{Pod, Zeroable};

/// Sixteen floats, one cache line.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A growable f32 buffer whose first element starts a cache line; reads as
/// the floats it has grown to.
#[derive(Default)]
pub struct LineBuf {
    lines: Vec<Line>,
    len: usize,
}

impl LineBuf {
    /// The first `n` floats, growing the buffer with zeros first when it is
    /// shorter; it never shrinks, so a steady caller allocates nothing.
    pub fn grow(&mut self, n: usize) -> &mut [f32] {
        if self.len < n {
            let lines = n.div_ceil(16);
            if self.lines.len() < lines {
                self.lines.resize(lines, Line::zeroed());
            }
            self.len = n;
        }
        &mut self[..n]
    }
}

impl FromIterator<f32> for LineBuf {
    fn from_iter<I: IntoIterator<Item = f32>>(values: I) -> LineBuf {
        let mut b = LineBuf::default();
        for v in values {
            if b.len.is_multiple_of(16) {
                b.lines.push(Line::zeroed());
            }
            b.lines[b.len / 16].0[b.len % 16] = v;
            b.len += 1;
        }
        b
    }
}

impl std::ops::Deref for LineBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl std::ops::DerefMut for LineBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_starts_on_a_line_and_keeps_what_it_held_as_it_grows() {
        let mut b = LineBuf::default();
        b.grow(5);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert_eq!(&b[..], &[0.0; 5]);
        b.grow(5).copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let grown = b.grow(1000);
        assert_eq!(grown.len(), 1000);
        assert_eq!(&grown[..5], &[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(grown[5..].iter().all(|&v| v == 0.0));
        assert_eq!(b.as_ptr() as usize % 64, 0);
        // Asking for less gives a prefix and keeps the length.
        assert_eq!(b.grow(3), &[1.0, 2.0, 3.0]);
        assert_eq!(b.len(), 1000);
    }

    #[test]
    fn a_collected_buffer_holds_the_values_in_order() {
        let b: LineBuf = (0..37).map(|i| i as f32).collect();
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert_eq!(b.len(), 37);
        assert!(b.iter().enumerate().all(|(i, &v)| v == i as f32));
    }
}
