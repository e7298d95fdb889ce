//! Malformed and hostile images: each gets a clear error, fast, with bounded memory and no
//! panic. Runs the fuzz targets' bodies on the committed seeds (fuzz/corpus) and on many
//! deterministic mutations of them, so CI exercises them without cargo-fuzz.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use strata_storage::format::qcow2::header::Header;
use strata_storage::format::qcow2::testing::{fuzz_header, fuzz_open};
use strata_storage::format::{open_image_on, ImageFormat};
use strata_storage::io::memory::MemoryDevice;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 8, "the {target} corpus lost its seeds");
    out
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Opens `bytes` and expects an error mentioning `what`, quickly.
fn refused(bytes: Vec<u8>, what: &str) {
    let began = Instant::now();
    let dev = MemoryDevice::read_only_with(&bytes);
    let r = open_image_on(dev, Some(ImageFormat::Qcow2));
    let took = began.elapsed();
    let e = match r {
        Ok(_) => panic!("an image with {what} was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.to_lowercase().contains(what),
        "expected an error about '{what}', got: {e}"
    );
    // A guard against runaway loops, not a performance measurement.
    assert!(
        took < Duration::from_secs(5),
        "refusing {what} took {took:?}"
    );
}

fn seed(name: &str) -> Vec<u8> {
    corpus("qcow2_open")
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

/// The `c512` seed with a bitmaps extension (auto-clear bit 0 set) whose directory of `dir`
/// bytes is appended at the end of the file, or placed at `dir_at` when given.
fn with_bitmaps(nb: u32, dir: &[u8], dir_at: Option<u64>) -> Vec<u8> {
    use strata_storage::format::qcow2::header::ext;
    let mut bytes = seed("c512");
    let mut h = Header::parse(&bytes).unwrap();
    let at = dir_at.unwrap_or(bytes.len() as u64);
    let mut e = Vec::new();
    e.extend_from_slice(&be32(nb));
    e.extend_from_slice(&be32(0));
    e.extend_from_slice(&be64(dir.len() as u64));
    e.extend_from_slice(&be64(at));
    h.set_extension(ext::BITMAPS, Some(e));
    h.autoclear_features |= 1;
    let head = h.serialize().unwrap();
    bytes[..head.len()].copy_from_slice(&head);
    if dir_at.is_none() {
        let mut d = dir.to_vec();
        d.resize(d.len().next_multiple_of(512), 0);
        bytes.extend_from_slice(&d);
    }
    bytes
}

/// A bitmap directory entry (type 1) for a table at `table` of `size` entries.
fn bitmap_entry(table: u64, size: u32, gbits: u8, name_size: u16, name: &[u8]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&be64(table));
    d.extend_from_slice(&be32(size));
    d.extend_from_slice(&be32(2));
    d.push(1);
    d.push(gbits);
    d.extend_from_slice(&name_size.to_be_bytes());
    d.extend_from_slice(&be32(0));
    d.extend_from_slice(name);
    d.resize(d.len().next_multiple_of(8), 0);
    d
}

/// Malformed bitmaps extensions: `bitmaps()` fails with a clear error, fast, `info` still works
/// (naming the problem), and nothing panics or allocates what the bytes ask for.
#[test]
fn malformed_bitmap_extensions_get_clear_errors() {
    use strata_storage::format::qcow2::{self, Qcow2Options};
    use strata_storage::format::Image;
    let size = Header::parse(&seed("c512")).unwrap().size;
    let table_entries = size.div_ceil(65536).div_ceil(512 * 8) as u32;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (with_bitmaps(1, &[0; 64], Some(1 << 40)), "outside the file"),
        (with_bitmaps(1, &[0; 64], Some(777)), "cluster boundary"),
        (with_bitmaps(u32::MAX, &[0; 64], None), "bitmaps (1 to"),
        (
            with_bitmaps(1, &bitmap_entry(512, u32::MAX, 16, 1, b"b"), None),
            "bitmap table of",
        ),
        (
            with_bitmaps(1, &bitmap_entry(1 << 40, table_entries, 16, 1, b"b"), None),
            "outside the file",
        ),
        (
            with_bitmaps(1, &bitmap_entry(512, table_entries, 16, 0, b""), None),
            "name of 0 bytes",
        ),
        (
            with_bitmaps(1, &bitmap_entry(512, table_entries, 16, 60000, b"b"), None),
            "name of 60000 bytes",
        ),
        (
            with_bitmaps(1, &bitmap_entry(512, table_entries, 16, 1000, b"b"), None),
            "runs past",
        ),
        (
            with_bitmaps(3, &bitmap_entry(512, table_entries, 16, 1, b"b"), None),
            "runs past",
        ),
        (
            with_bitmaps(1, &bitmap_entry(512, table_entries, 63, 1, b"b"), None),
            "granularity",
        ),
    ];
    for (bytes, what) in cases {
        let began = Instant::now();
        let dev = MemoryDevice::read_only_with(&bytes);
        let img = qcow2::open(dev, &Qcow2Options::default()).unwrap();
        let e = img.bitmaps().unwrap_err().to_string();
        assert!(e.contains(what), "expected '{what}', got: {e}");
        let info = img.info().unwrap();
        assert!(
            info.format_specific.contains_key("bitmaps-error"),
            "{what}: info names the problem"
        );
        assert!(began.elapsed() < Duration::from_secs(5), "{what}");
    }
}

#[test]
fn malformed_headers_get_clear_errors() {
    let base = seed("c512");
    let patch = |at: usize, v: &[u8]| {
        let mut b = base.clone();
        b[at..at + v.len()].copy_from_slice(v);
        b
    };
    refused(patch(48, &be64(0)), "refcount table is at offset 0");
    refused(patch(40, &be64(1 << 40)), "l1 table");
    refused(patch(20, &be32(40)), "cluster_bits 40");
    refused(patch(20, &be32(3)), "cluster_bits 3");
    refused(patch(36, &be32(u32::MAX)), "l1 table");
    refused(patch(24, &be64(u64::MAX)), "too small");
    refused(patch(24, &be64(1 << 50)), "too small");
    refused(patch(4, &be32(4)), "version 4");
    refused(patch(4, &be32(1)), "version 1");
    refused(base[..50].to_vec(), "less than a qcow2 header");
    refused(patch(72, &be64(1 << 20)), "incompatible feature bit 20");
    refused(patch(72, &be64(1 << 2)), "external data file");
    refused(patch(32, &be32(2)), "luks");
    refused(patch(32, &be32(1)), "aes");
    refused(patch(56, &be32(u32::MAX)), "refcount table");
    refused(patch(60, &be32(1_000_000)), "snapshot");
    refused(
        patch(8, &be64(400))
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                if (16..20).contains(&i) {
                    [0, 0, 0x10, 0][i - 16]
                } else {
                    b
                }
            })
            .collect(),
        "backing file name",
    );
    refused(patch(100, &be32(7)), "header_length");
    // An extension whose length runs past the first cluster.
    let ext_at = 112; // header_length of QEMU's version 3 images
    refused(
        patch(ext_at, &[0x12, 0x34, 0x56, 0x78, 0x7f, 0xff, 0xff, 0xff]),
        "extension",
    );
}

#[test]
fn a_backing_file_that_is_the_image_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("self.qcow2");
    let mut map = std::collections::BTreeMap::new();
    map.insert("cluster_size".to_string(), "4096".to_string());
    strata_storage::format::create_image(&p, ImageFormat::Qcow2, 1 << 20, &map).unwrap();
    // Point the image at itself through a rebase that only rewrites the header.
    strata_storage::format::qcow2::tools::rebase(
        &p,
        Some("self.qcow2"),
        Some(ImageFormat::Qcow2),
        true,
    )
    .unwrap();
    let e = strata_storage::format::open_image(&p, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("loops"), "{e}");
    // An out-of-range backing name offset.
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[8..16].copy_from_slice(&be64(1 << 30));
    refused(bytes, "backing file name");
}

#[test]
fn corrupt_tables_fail_reads_not_the_process() {
    let mut b = seed("c512");
    let h = Header::parse(&b).unwrap();
    // L1 entry 0 points beyond the end of the file.
    let at = h.l1_table_offset as usize;
    b[at..at + 8].copy_from_slice(&be64((1u64 << 40) | (1 << 63)));
    let dev = MemoryDevice::read_only_with(&b);
    let img = open_image_on(dev, Some(ImageFormat::Qcow2)).unwrap();
    let mut q = strata_storage::io::blocking::BlockingQueue::open(img.as_ref(), 4).unwrap();
    let e = q.read_at(0, 4096).unwrap_err().to_string();
    assert!(e.contains("beyond the end"), "{e}");
    fuzz_open(&b);
}

#[test]
fn seeds_run_through_both_fuzz_targets() {
    for (name, data) in corpus("qcow2_header") {
        fuzz_header(&data);
        assert!(
            Header::parse(&data).is_ok(),
            "header seed {name} does not parse"
        );
    }
    for (name, data) in corpus("qcow2_open") {
        let dev = MemoryDevice::read_only_with(&data);
        let opts = strata_storage::format::qcow2::Qcow2Options {
            no_backing: true,
            ..Default::default()
        };
        assert!(
            strata_storage::format::qcow2::open(dev, &opts).is_ok(),
            "seed {name} does not open"
        );
        fuzz_open(&data);
    }
}

#[test]
fn mutated_seeds_never_panic() {
    let mut rng = fastrand::Rng::with_seed(0x9c0f2);
    let interesting: [u64; 8] = [
        0,
        1,
        0x1ff,
        0x200,
        u32::MAX as u64,
        u64::MAX,
        1 << 63,
        0x8000_0000_0001_0000,
    ];
    for (_, data) in corpus("qcow2_open") {
        for _ in 0..150 {
            let mut m = data.clone();
            for _ in 0..rng.usize(1..6) {
                // Mostly the metadata: header, then anywhere.
                let limit = if rng.bool() {
                    512.min(m.len())
                } else {
                    m.len()
                };
                let at = rng.usize(..limit.saturating_sub(8).max(1));
                if rng.bool() {
                    let v = interesting[rng.usize(..interesting.len())];
                    let n = (m.len() - at).min(8);
                    m[at..at + n].copy_from_slice(&v.to_be_bytes()[..n]);
                } else {
                    m[at] ^= 1 << rng.u8(..8);
                }
            }
            if rng.u8(..10) == 0 {
                m.truncate(rng.usize(..m.len()));
            }
            let began = Instant::now();
            fuzz_open(&m);
            fuzz_header(&m);
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "a mutated image took {:?}",
                began.elapsed()
            );
        }
    }
}

#[test]
fn regression_refcount_block_offset_near_the_top_of_the_address_space() {
    // Found by mutation: a refcount table entry of 0xffff_ffff_ffff_fe00 overflowed the bounds
    // check of the block it points at.
    let mut b = seed("c512");
    let h = Header::parse(&b).unwrap();
    let at = h.refcount_table_offset as usize;
    b[at..at + 8].copy_from_slice(&be64(0xffff_ffff_ffff_fe00));
    fuzz_open(&b);
    let dev = MemoryDevice::read_only_with(&b);
    let img = strata_storage::format::qcow2::open(dev, &Default::default()).unwrap();
    let r = img
        .check(strata_storage::format::qcow2::check::Repair::None)
        .unwrap();
    assert!(r.check_errors > 0 || r.corruptions > 0, "{:?}", r.messages);
}

#[test]
fn regression_reference_ranges_that_overflow() {
    // Found by mutation: a structure at an offset near 2^64 overflowed the end of its range in
    // check's reference counting. A bitmaps extension pointing anywhere exercises the same path.
    let mut b = seed("c512");
    let mut h = Header::parse(&b).unwrap();
    h.autoclear_features = 1;
    let mut ext = vec![0u8; 24];
    ext[0..4].copy_from_slice(&be32(1));
    ext[8..16].copy_from_slice(&be64(24));
    ext[16..24].copy_from_slice(&be64(1024));
    h.extensions
        .push(strata_storage::format::qcow2::header::Extension {
            kind: 0x2385_2875,
            data: ext,
        });
    let head = h.serialize().unwrap();
    b[..head.len()].copy_from_slice(&head);
    // The bitmap directory entry at 1024: a bitmap table at the top of the address space.
    b[1024..1032].copy_from_slice(&be64(u64::MAX - 7));
    b[1032..1036].copy_from_slice(&be32(4));
    fuzz_open(&b);
}

/// Refcounts that claim every cluster the refcount table could cover (all its entries pointing
/// at one block full of 1s) made the first allocation scan hundreds of millions of clusters:
/// the scan now stops past the file's end with an error.
#[test]
fn refcounts_claiming_clusters_far_past_the_end_fail_an_allocation_fast() {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claims.qcow2");
    strata_storage::format::create_image(&path, ImageFormat::Qcow2, 64 << 20, &Default::default())
        .unwrap();
    let mut b = std::fs::read(&path).unwrap();
    let h = Header::parse(&b).unwrap();
    let cs = 1usize << h.cluster_bits;
    let rt = h.refcount_table_offset as usize;
    let block = u64::from_be_bytes(b[rt..rt + 8].try_into().unwrap()) as usize;
    assert!(block > 0 && block + cs <= b.len(), "unexpected layout");
    let width = 1usize << h.refcount_order; // bits per refcount
    assert_eq!(width, 16, "the test writes 16-bit refcounts");
    for e in b[block..block + cs].chunks_mut(2) {
        e.copy_from_slice(&1u16.to_be_bytes());
    }
    let entries = h.refcount_table_clusters as usize * cs / 8;
    for i in 0..entries {
        b[rt + 8 * i..rt + 8 * i + 8].copy_from_slice(&be64(block as u64));
    }
    std::fs::write(&path, &b).unwrap();
    let img =
        strata_storage::format::open_image(&path, &strata_storage::format::OpenOptions::default())
            .unwrap();
    let mut q = img.open_queue(&QueueOptions::with_depth(1)).unwrap();
    let write = Request::write(1, 0, IoBuf::from_slice(&[7u8; 4096]));
    let e = run_one(q.as_mut(), write, "the allocation is still scanning")
        .result
        .unwrap_err();
    assert!(e.to_string().contains("beyond the end of the file"), "{e}");
}

/// Runs `req` alone on queue `q` and returns its completion, failing the test with `stuck` if
/// it takes a minute.
fn run_one(
    q: &mut dyn strata_storage::io::IoQueue,
    req: strata_storage::io::Request,
    stuck: &str,
) -> strata_storage::io::Completion {
    let _ = q.submit(req);
    let mut done = Vec::new();
    let began = Instant::now();
    while done.is_empty() {
        q.wait(Some(Duration::from_secs(1))).unwrap();
        q.reap(&mut done);
        assert!(began.elapsed() < Duration::from_secs(60), "{stuck}");
    }
    done.pop().unwrap()
}

/// Writes `data` at guest offset 0 through a queue; returns the completion's result.
fn write_at_zero(
    img: &std::sync::Arc<dyn strata_storage::format::Image>,
    data: &[u8],
) -> strata_storage::Result<u64> {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let mut q = img.open_queue(&QueueOptions::with_depth(1)).unwrap();
    run_one(
        q.as_mut(),
        Request::write(1, 0, IoBuf::from_slice(data)),
        "the write hangs",
    )
    .result
}

/// A new 64 MiB qcow2 image `name` in `dir` whose first 4 KiB were written with `byte` and
/// flushed.
fn qcow2_written_at_zero(dir: &std::path::Path, name: &str, byte: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    let opts = strata_storage::format::OpenOptions::default();
    strata_storage::format::create_image(&path, ImageFormat::Qcow2, 64 << 20, &Default::default())
        .unwrap();
    let img = strata_storage::format::open_image(&path, &opts).unwrap();
    write_at_zero(&img, &[byte; 4096]).unwrap();
    img.flush().unwrap();
    path
}

/// The offset of the L2 table that the first L1 entry of the image in `bytes` names.
fn first_l2_table(bytes: &[u8]) -> usize {
    let l1 = Header::parse(bytes).unwrap().l1_table_offset as usize;
    (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize
}

/// An L2 entry that names a metadata cluster — the refcount table with the COPIED flag (a
/// write would go straight over it), or the L1 table without it (copy-on-write would free it) —
/// fails the guest write and leaves the tables as they were.
#[test]
fn l2_entries_naming_metadata_fail_writes_and_leave_the_tables_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_written_at_zero(dir.path(), "overlap.qcow2", 1);
    let opts = strata_storage::format::OpenOptions::default();
    let clean = std::fs::read(&path).unwrap();
    let h = Header::parse(&clean).unwrap();
    let cs = 1u64 << h.cluster_bits;
    let l1 = h.l1_table_offset as usize;
    let l2 = first_l2_table(&clean);
    assert!(l2 != 0);
    let rt = h.refcount_table_offset as usize;
    for (entry, table, name) in [
        ((1u64 << 63) | h.refcount_table_offset, rt, "refcount table"),
        (h.l1_table_offset, l1, "L1 table"),
    ] {
        let mut b = clean.clone();
        b[l2..l2 + 8].copy_from_slice(&be64(entry));
        std::fs::write(&path, &b).unwrap();
        let before = b[table..table + cs as usize].to_vec();
        {
            let img = strata_storage::format::open_image(&path, &opts).unwrap();
            let e = write_at_zero(&img, &[0x3fu8; 4096]).unwrap_err();
            assert!(e.to_string().contains("metadata"), "{name}: {e}");
            let _ = img.flush();
        }
        let after = std::fs::read(&path).unwrap();
        assert_eq!(
            &after[table..table + cs as usize],
            &before[..],
            "the {name} was changed"
        );
    }
}

/// A data cluster that the end of the file cuts short: a read of its bytes on disk returns
/// them, a read reaching past the end fails with an error naming the range (never whatever the
/// guest buffer held).
#[test]
fn a_data_cluster_cut_short_by_the_end_of_the_file_fails_reads_past_the_end() {
    use strata_storage::io::{IoBuf, QueueOptions, Request};
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_written_at_zero(dir.path(), "short.qcow2", 0x5a);
    let b = std::fs::read(&path).unwrap();
    let l2 = first_l2_table(&b);
    let host = u64::from_be_bytes(b[l2..l2 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    assert!(host != 0 && host + 4096 <= b.len() as u64);
    // The file ends half-way into the first 4 KiB of the data cluster.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(host + 2048)
        .unwrap();
    let ro = strata_storage::format::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let img = strata_storage::format::open_image(&path, &ro).unwrap();
    let mut q = img.open_queue(&QueueOptions::with_depth(1)).unwrap();
    let mut read = |len: usize| {
        let buf = IoBuf::from_slice(&vec![0xee; len]);
        run_one(q.as_mut(), Request::read(1, 0, buf), "the read hangs")
    };
    let c = read(2048);
    assert_eq!(c.result.unwrap(), 2048);
    assert!(c.buf.unwrap().to_vec().iter().all(|&x| x == 0x5a));
    let e = read(4096).result.unwrap_err();
    assert!(
        matches!(e, strata_storage::StorageError::OutOfRange { .. }),
        "{e}"
    );
}
