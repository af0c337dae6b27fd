//! The mDNS advert parser on arbitrary TXT record data (DNS wire form: a
//! sequence of length-prefixed `key=value` strings): it must return an
//! error or an advert, never panic, and an accepted advert must survive
//! its own TXT records unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use loip::cluster::discovery::Advert;

/// Splits TXT rdata into (key, value) pairs as a resolver would; a string
/// without `=` is a key without a value.
fn records(mut data: &[u8]) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = data.split_first() {
        let len = (len as usize).min(rest.len());
        let (s, rest) = rest.split_at(len);
        data = rest;
        let (k, v) = match s.iter().position(|&b| b == b'=') {
            Some(i) => (&s[..i], Some(s[i + 1..].to_vec())),
            None => (s, None),
        };
        out.push((String::from_utf8_lossy(k).into_owned(), v));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let r = records(data);
    let Ok(a) = Advert::parse(r.iter().map(|(k, v)| (k.as_str(), v.as_deref()))) else {
        return;
    };
    let txt = a.txt();
    let again = Advert::parse(txt.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
        .expect("an advert's own records parse");
    assert_eq!(again, a);
});
