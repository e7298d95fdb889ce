//! Fuzzes the vmdk descriptor parser and renderer: no input may panic, and whatever parses
//! must render to text that parses to the same descriptor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_storage::format::vmdk::fuzz::descriptor(data);
});
