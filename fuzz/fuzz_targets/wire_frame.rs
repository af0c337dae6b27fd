//! The frame decoder of the wire between nodes (DESIGN.md §7) on arbitrary
//! bytes, then the control messages it may carry (the shell's and the
//! ring's): each must return an error or a value, never panic or allocate
//! past the frame limits, and an accepted tensor frame must encode back to
//! the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use loip::cluster::ring::wire::Msg;
use loip::cluster::shell::Wire;
use loip::net::frame::{self, Frame, FrameLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits, so that sizes near them are reachable.
    let limits = FrameLimits {
        max_control: 64 << 10,
        max_tensor: 1 << 20,
    };
    // The first byte chooses whether the reader expects an epoch.
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let epoch = (pick & 1 == 1).then_some(u64::from(pick >> 1));
    match frame::decode(bytes, &limits, epoch) {
        Ok(f @ Frame::Control(_)) => {
            let _ = f.control::<Wire>();
            let _ = f.control::<Msg>();
        }
        Ok(Frame::Tensor(t)) => {
            let again = frame::encode_tensor(&t).expect("an accepted frame encodes");
            assert_eq!(again, bytes, "a tensor frame survives its own encoding");
        }
        Err(_) => {}
    }
});
