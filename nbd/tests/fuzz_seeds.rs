//! Runs the NBD fuzz targets' seeds (fuzz/corpus/nbd_*) and many deterministic mutations of
//! them through the same functions in ordinary `cargo test`, so CI covers the handshake and
//! request parsers without cargo-fuzz.

use std::path::Path;

use strata_nbd::{Access, ExportConfig, ExportRegistry};
use strata_storage::io::memory::MemoryDevice;

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out.sort();
    out
}

/// Mutations of `seed`: byte flips, truncations, insertions of large values.
fn mutations(seed: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let mut m = seed.to_vec();
            match next() % 4 {
                0 if !m.is_empty() => {
                    let i = (next() as usize) % m.len();
                    m[i] ^= (next() as u8) | 1;
                }
                1 => m.truncate((next() as usize) % (m.len() + 1)),
                2 if m.len() >= 4 => {
                    let i = (next() as usize) % (m.len() - 3);
                    m[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, (next() as u8)]);
                }
                _ => {
                    let i = (next() as usize) % (m.len() + 1);
                    m.insert(i, next() as u8);
                }
            }
            m
        })
        .collect()
}

#[test]
fn handshake_seeds_and_mutations() {
    let r = ExportRegistry::new();
    r.add(ExportConfig {
        name: "disk".into(),
        description: "memory".into(),
        device: MemoryDevice::new(1 << 20),
        read_only: false,
        bitmaps: None,
        access: Access::Open,
        keep_alive: None,
    })
    .unwrap();
    r.set_default(Some("disk")).unwrap();
    for seed in seeds("nbd_handshake") {
        // Each seed gets through the handshake: the server wrote more than its greeting.
        assert!(strata_nbd::fuzz::handshake_and_requests(&r, &seed) > 18);
        for m in mutations(&seed, 3000) {
            strata_nbd::fuzz::handshake_and_requests(&r, &m);
        }
    }
}

#[test]
fn request_seeds_and_mutations() {
    for seed in seeds("nbd_requests") {
        strata_nbd::fuzz::requests(&seed);
        for m in mutations(&seed, 5000) {
            strata_nbd::fuzz::requests(&m);
        }
    }
}
