//! Runs the committed fuzz seeds (fuzz/corpus/vmdk_*) and thousands of mutations of them
//! through the vmdk parsers, so CI covers the fuzz targets without cargo-fuzz.

use std::path::{Path, PathBuf};

use strata_storage::format::vmdk::fuzz;

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
    assert!(v.len() >= 3, "the {name} corpus has too few seeds");
    v
}

fn mutate(rng: &mut fastrand::Rng, seed: &[u8], interesting: &[&[u8]]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.usize(1..6) {
        if d.is_empty() {
            d.push(rng.u8(..));
        }
        let at = rng.usize(..d.len());
        match rng.u8(..6) {
            0 => d[at] ^= 1 << rng.u8(..8),
            1 => d[at] = rng.u8(..),
            2 => d.truncate(at),
            3 => d.insert(at, rng.u8(..)),
            4 => {
                let word = interesting[rng.usize(..interesting.len())];
                let end = (at + word.len()).min(d.len());
                d[at..end].copy_from_slice(&word[..end - at]);
            }
            _ => {
                // Overwrite a header-ish field with an extreme value.
                let v = [0u64, 1, u32::MAX as u64, u64::MAX, 1 << 40][rng.usize(..5)];
                let at = at.min(d.len().saturating_sub(8));
                let end = (at + 8).min(d.len());
                d[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
        }
    }
    d
}

#[test]
fn descriptor_seeds_and_mutations() {
    let words: [&[u8]; 8] = [
        b"\"",
        b"\r\n",
        b"#",
        b"=",
        b" RW 99999999999 FLAT ",
        b"../",
        b"parentCID=1",
        b"\0",
    ];
    let mut rng = fastrand::Rng::with_seed(1);
    for (_, seed) in corpus("vmdk_descriptor") {
        fuzz::descriptor(&seed);
        for _ in 0..3000 {
            fuzz::descriptor(&mutate(&mut rng, &seed, &words));
        }
    }
}

#[test]
fn sparse_image_seeds_and_mutations() {
    let words: [&[u8]; 5] = [b"KDMV", &[0xff; 8], &[0; 8], b"\x01\0\0\0", b"x\x9c"];
    let mut rng = fastrand::Rng::with_seed(2);
    for (path, seed) in corpus("vmdk_sparse_header") {
        fuzz::image(&seed);
        for _ in 0..400 {
            // Mutations concentrate on the first sectors, where the header and tables are.
            let head = seed.len().min(16 << 10);
            let mut m = mutate(&mut rng, &seed[..head], &words);
            if m.len() == head {
                m.extend_from_slice(&seed[head..]);
            }
            fuzz::image(&m);
        }
        eprintln!("ran {}", path.display());
    }
}

/// Regenerates the binary seeds: `cargo test --test vmdk_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "regenerates the committed seeds: run by hand"]
fn regenerate_sparse_seeds() {
    use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};
    use strata_storage::io::blocking::BlockingQueue;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/vmdk_sparse_header");
    let dir = tempfile::tempdir().unwrap();
    let sparse = dir.path().join("s.vmdk");
    format::create_image(
        &sparse,
        ImageFormat::Vmdk,
        1 << 20,
        &format::parse_options("zeroed_grain=on").unwrap(),
    )
    .unwrap();
    {
        let img = open_image(&sparse, &OpenOptions::default()).unwrap();
        let mut q = BlockingQueue::open(img.as_ref(), 2).unwrap();
        q.write_at(4096, b"strata fuzz seed").unwrap();
        q.write_zeroes(65536 * 3, 65536, false).unwrap();
        q.flush().unwrap();
    }
    std::fs::copy(&sparse, out.join("monolithic-sparse-zeroed-grain.vmdk")).unwrap();
    let stream = dir.path().join("t.vmdk");
    let mut w =
        format::create_compressed(&stream, ImageFormat::Vmdk, 200 * 1024, &Default::default())
            .unwrap();
    w.write_unit(65536, &[b's'; 65536]).unwrap();
    w.write_unit(131072, &[b't'; 65536]).unwrap();
    w.write_unit(196608, &[b'u'; 8192]).unwrap();
    w.finish().unwrap();
    std::fs::copy(&stream, out.join("stream-optimized.vmdk")).unwrap();
    let plain = dir.path().join("p.vmdk");
    format::create_image(&plain, ImageFormat::Vmdk, 3 << 20, &Default::default()).unwrap();
    std::fs::copy(&plain, out.join("monolithic-sparse-empty.vmdk")).unwrap();
}
