//! Bytes that sniff as XML → `postback::parse`, so quick-xml's reader and the
//! tree folding are what gets exercised. Never panics.

#![no_main]

use libfuzzer_sys::{fuzz_target, Corpus};
use postback_relay::postback::{parse, Format};

mod common;

fuzz_target!(|data: &[u8]| -> Corpus {
    // Anything else is refused before the XML reader: not worth a corpus entry.
    if common::sniff(data) != Some(Format::Xml) {
        return Corpus::Reject;
    }
    let result = parse(data, Some("text/xml"));
    common::check_parsed(&result, Some(Format::Xml));
    Corpus::Keep
});
