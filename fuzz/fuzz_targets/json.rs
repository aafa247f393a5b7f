//! Bytes that sniff as JSON → `postback::parse`, so serde_json and the tree
//! folding are what gets exercised. Never panics.

#![no_main]

use libfuzzer_sys::{fuzz_target, Corpus};
use postback_relay::postback::{parse, Format};

mod common;

fuzz_target!(|data: &[u8]| -> Corpus {
    // Anything else is refused before the JSON reader: not worth a corpus entry.
    if common::sniff(data) != Some(Format::Json) {
        return Corpus::Reject;
    }
    let result = parse(data, Some("application/json"));
    common::check_parsed(&result, Some(Format::Json));
    Corpus::Keep
});
