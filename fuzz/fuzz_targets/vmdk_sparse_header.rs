//! Fuzzes opening a vmdk from untrusted bytes: the sparse extent header, the embedded
//! descriptor, grain directory and tables, stream footers and compressed grains. No input may
//! panic; whatever opens must answer reads and block-status queries with data or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_storage::format::vmdk::fuzz::image(data);
});
