//! Runs the committed fuzz seeds (fuzz/corpus/vhd_*, vhdx_*) and mutations of them through the
//! VHD and VHDX fuzz entry points, so CI covers the fuzz targets without cargo-fuzz. Mutations
//! aim at the fields that matter (sizes, offsets, counts, states) and keep checksums valid half
//! the time (the entry points also try every input resealed).

use std::path::{Path, PathBuf};

use strata_storage::format::{vhd, vhdx};

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "the {name} corpus is empty");
    v
}

/// Offsets worth mutating: the start (headers), the end (VHD footer), and for VHDX the
/// headers, region tables, log, metadata and BAT (1 MiB-aligned regions).
fn hot_spot(rng: &mut fastrand::Rng, len: usize) -> usize {
    let spots = [
        0usize,
        len.saturating_sub(512),
        512,
        1536,
        64 << 10,
        128 << 10,
        192 << 10,
        1 << 20,
        2 << 20,
        3 << 20,
        (2 << 20) + (64 << 10),
    ];
    let base = spots[rng.usize(..spots.len())].min(len.saturating_sub(1));
    (base + rng.usize(..128)).min(len.saturating_sub(1))
}

fn mutate(rng: &mut fastrand::Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    if d.is_empty() {
        return vec![rng.u8(..)];
    }
    for _ in 0..rng.usize(1..5) {
        let at = hot_spot(rng, d.len());
        match rng.u8(..5) {
            0 => d[at] ^= 1 << rng.u8(..8),
            1 => d[at] = rng.u8(..),
            2 => {
                let v = [0u64, 1, 7, u32::MAX as u64, u64::MAX, 1 << 40, 1 << 20][rng.usize(..7)];
                let end = (at + 8).min(d.len());
                let bytes = if rng.bool() {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                d[at..end].copy_from_slice(&bytes[..end - at]);
            }
            3 => d.truncate(at.max(1)),
            _ => {
                let end = (at + 4).min(d.len());
                d[at..end].fill(0xff);
            }
        }
    }
    d
}

fn run(name: &str, per_seed: usize, f: fn(&[u8])) {
    for (i, (path, seed)) in corpus(name).into_iter().enumerate() {
        f(&seed);
        let mut rng = fastrand::Rng::with_seed(0x5eed + i as u64);
        for n in 0..per_seed {
            let m = mutate(&mut rng, &seed);
            let r = std::panic::catch_unwind(|| f(&m));
            if r.is_err() {
                let keep = std::env::temp_dir().join(format!("{name}-crash-{i}-{n}"));
                let _ = std::fs::write(&keep, &m);
                panic!(
                    "{}: mutation {n} panicked (input kept at {})",
                    path.display(),
                    keep.display()
                );
            }
        }
    }
}

#[test]
fn vhd_seeds_and_mutations() {
    run("vhd_open", 1500, vhd::fuzz::image);
}

#[test]
fn vhd_locator_seeds_and_mutations() {
    run("vhd_locator", 2000, vhd::fuzz::locator);
}

#[test]
fn vhdx_seeds_and_mutations() {
    run("vhdx_open", 150, vhdx::fuzz::image);
}

#[test]
fn vhdx_log_seeds_and_mutations() {
    run("vhdx_log", 300, vhdx::fuzz::replay);
}
