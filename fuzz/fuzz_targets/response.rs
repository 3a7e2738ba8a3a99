//! Fuzz target: the response-head scanner and the chunked decoder must not panic, must respect their
//! limits, and must come to the same outcome however the input is cut into reads. The first bytes
//! choose the cut points; the rest is the response.
#![no_main]

#[path = "../../src/deliver/wire.rs"]
#[allow(dead_code)]
mod wire;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8);
    if rest.len() < 2 * n {
        return;
    }
    let (cut_bytes, response) = rest.split_at(2 * n);
    let cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (response.len() + 1))
        .collect();
    if let Err(e) = wire::check_in_pieces(response, &cuts) {
        panic!("{e}");
    }
});
