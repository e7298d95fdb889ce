//! Entry points for the cargo-fuzz targets in `fuzz/` and for the seed-corpus test that runs
//! in CI without cargo-fuzz (feature `test-utils`). Each takes untrusted bytes and panics only
//! if the code under test misbehaves.
#![allow(clippy::panic)]

use crate::format::vmdk::descriptor::Descriptor;
use crate::format::OpenOptions;
use crate::io::memory::MemoryDevice;

/// Parses a descriptor; a parsed one must survive rendering and parsing again.
pub fn descriptor(data: &[u8]) {
    if let Ok(d) = Descriptor::parse(data) {
        let again = Descriptor::parse(d.render().as_bytes())
            .unwrap_or_else(|e| panic!("a rendered descriptor does not parse: {e}"));
        assert_eq!(
            again.extents.len(),
            d.extents.len(),
            "rendering lost extents"
        );
        assert_eq!(again.size(), d.size(), "rendering changed the size");
    }
}

/// Opens an image held in `data` (read-only, without a path) and exercises it.
pub fn image(data: &[u8]) {
    let dev = MemoryDevice::read_only_with(data);
    let opts = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let Ok(img) = super::open(dev, None, &opts) else {
        return;
    };
    crate::format::fuzzing::poke(img.as_ref());
}
