//! Fuzzes the NBD handshake (greeting, client flags, every option and its payload) and the
//! requests that follow it, against a registry with one in-memory export that has a bitmap-less
//! sparse device: no input may panic, loop without end or allocate without bound.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_nbd::{Access, ExportConfig, ExportRegistry};
use strata_storage::io::memory::MemoryDevice;

fn registry() -> &'static ExportRegistry {
    static R: OnceLock<std::sync::Arc<ExportRegistry>> = OnceLock::new();
    R.get_or_init(|| {
        let r = ExportRegistry::new();
        for name in ["disk", "other"] {
            r.add(ExportConfig {
                name: name.into(),
                description: "memory".into(),
                device: MemoryDevice::new(1 << 20),
                read_only: name == "other",
                bitmaps: None,
                access: Access::Open,
                keep_alive: None,
            })
            .unwrap();
        }
        r.set_default(Some("disk")).unwrap();
        r
    })
}

fuzz_target!(|data: &[u8]| {
    strata_nbd::fuzz::handshake_and_requests(registry(), data);
});
