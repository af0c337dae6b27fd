//! The HTTP API's request parsing and checks (`serve::api`) on arbitrary
//! bodies, as both endpoints do them: an error (a 4xx) or a checked
//! request, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use loip::serve::api::{self, ChatRequest, CompletionRequest};

fuzz_target!(|body: &[u8]| {
    if let Ok(r) = api::parse::<ChatRequest>(body) {
        let _ = r.common.check();
        let _ = r.chat();
    }
    if let Ok(r) = api::parse::<CompletionRequest>(body) {
        let _ = r.common.check();
        let _ = r.text();
    }
});
