//! Fuzzes the decision on transmission requests (type, flags, offset, length against the
//! export's size and features) and the structured read replies built for them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_nbd::fuzz::requests(data);
});
