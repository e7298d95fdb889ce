//! Thin pools: snapshots and clones keep their contents, at any depth; removing an origin leaves
//! its snapshots and clones intact; a full pool fails writes with out-of-space without damaging
//! anything and recovers after a discard or an extension; metadata survives a reopen.

mod volume_util;

use std::sync::Arc;

use strata_storage::volume::{LvType, PvHandle, Vg, VgOptions};
use strata_storage::{BlockDevice, SharedFile, StorageError};
use volume_util::*;

const BLOCK: u64 = 64 << 10;

#[test]
fn snapshots_keep_their_contents_at_any_depth() {
    let vg = mem_vg("vg", &[256 * MIB], 4 * MIB);
    vg.create_pool("pool", 128 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "base", 64 * MIB).unwrap();
    let dev = vg.open_lv("base", false).unwrap();
    let mut q = bq(&dev);
    let depth = 40u64;
    for k in 0..depth {
        // Overwrite block 0 each time, and add block k+1: old snapshots must not change.
        q.write_at(0, &pattern(1000 + k, 4096)).unwrap();
        q.write_at((k + 1) * BLOCK + 512, &pattern(k, 8192))
            .unwrap();
        vg.snapshot("base", &format!("s{k}")).unwrap();
    }
    for k in 0..depth {
        let s = vg.open_lv(&format!("s{k}"), true).unwrap();
        let mut sq = bq(&s);
        assert_eq!(
            sq.read_at(0, 4096).unwrap(),
            pattern(1000 + k, 4096),
            "s{k} block 0"
        );
        for j in 0..depth {
            let got = sq.read_at((j + 1) * BLOCK + 512, 8192).unwrap();
            let want = if j <= k {
                pattern(j, 8192)
            } else {
                vec![0u8; 8192]
            };
            assert_eq!(got, want, "s{k} block {}", j + 1);
        }
    }
    let info = vg.lv_info("s3").unwrap();
    assert_eq!(info.kind, LvType::Snapshot);
    assert_eq!(info.origin.as_deref(), Some("base"));
    assert!(vg.open_lv("s3", false).unwrap().read_only());
    assert!(vg.check().unwrap().is_clean(), "{:?}", vg.check().unwrap());
}

#[test]
fn clones_are_independent_and_survive_their_origins() {
    let vg = mem_vg("vg", &[128 * MIB], 4 * MIB);
    vg.create_pool("pool", 64 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "tmpl", 16 * MIB).unwrap();
    {
        let d = vg.open_lv("tmpl", false).unwrap();
        bq(&d).write_at(0, &pattern(7, 3 * BLOCK as usize)).unwrap();
    }
    // A writable volume cannot be cloned until it is a template.
    assert!(vg.clone_lv("tmpl", "c0").is_err());
    vg.set_template("tmpl", true).unwrap();
    assert!(vg.lv_info("tmpl").unwrap().template);
    vg.clone_lv("tmpl", "c1").unwrap();
    vg.clone_lv("tmpl", "c2").unwrap();
    let c1 = vg.open_lv("c1", false).unwrap();
    let c2 = vg.open_lv("c2", false).unwrap();
    bq(&c1).write_at(100, b"clone one").unwrap();
    bq(&c2).write_at(BLOCK, &[9u8; 4096]).unwrap();
    let mut base = pattern(7, 3 * BLOCK as usize);
    let mut want1 = base.clone();
    want1[100..109].copy_from_slice(b"clone one");
    base[BLOCK as usize..BLOCK as usize + 4096].fill(9);
    assert_eq!(bq(&c1).read_at(0, 3 * BLOCK as usize).unwrap(), want1);
    assert_eq!(bq(&c2).read_at(0, 3 * BLOCK as usize).unwrap(), base);
    // Removing the template leaves the clones intact; a snapshot of a clone can be cloned.
    vg.remove_lv("tmpl").unwrap();
    assert_eq!(bq(&c1).read_at(0, 3 * BLOCK as usize).unwrap(), want1);
    vg.snapshot("c2", "c2snap").unwrap();
    vg.clone_lv("c2snap", "c3").unwrap();
    drop((c1, c2));
    vg.remove_lv("c2").unwrap();
    let c3 = vg.open_lv("c3", false).unwrap();
    assert_eq!(bq(&c3).read_at(0, 3 * BLOCK as usize).unwrap(), base);
    assert!(vg.check().unwrap().is_clean());
}

#[test]
fn an_open_volume_cannot_be_removed_and_names_are_unique() {
    let vg = mem_vg("vg", &[64 * MIB], 4 * MIB);
    vg.create_pool("pool", 32 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "a", 8 * MIB).unwrap();
    vg.create_linear("lin", 4 * MIB, &[]).unwrap();
    for taken in ["a", "lin", "pool"] {
        assert!(matches!(
            vg.create_thin("pool", taken, MIB),
            Err(StorageError::AlreadyExists(_))
        ));
        assert!(matches!(
            vg.create_linear(taken, MIB, &[]),
            Err(StorageError::AlreadyExists(_))
        ));
    }
    let d = vg.open_lv("a", false).unwrap();
    assert!(matches!(vg.remove_lv("a"), Err(StorageError::Busy(_))));
    drop(d);
    vg.remove_lv("a").unwrap();
    assert!(matches!(vg.remove_lv("a"), Err(StorageError::NotFound(_))));
    vg.create_thin("pool", "b", MIB).unwrap();
    assert!(matches!(vg.remove_lv("pool"), Err(StorageError::Busy(_))));
    assert!(vg
        .snapshot("lin", "x")
        .unwrap_err()
        .to_string()
        .contains("only thin volumes"));
}

fn write_blocks(
    dev: &Arc<dyn BlockDevice>,
    first: u64,
    n: u64,
    seed: u64,
) -> Result<(), (u64, StorageError)> {
    let mut q = bq(dev);
    for i in first..first + n {
        q.write_at(i * BLOCK, &pattern(seed + i, BLOCK as usize))
            .map_err(|e| (i, e))?;
    }
    Ok(())
}

fn check_blocks(dev: &Arc<dyn BlockDevice>, first: u64, n: u64, seed: u64) {
    let mut q = bq(dev);
    for i in first..first + n {
        assert_eq!(
            q.read_at(i * BLOCK, BLOCK as usize).unwrap(),
            pattern(seed + i, BLOCK as usize),
            "block {i}"
        );
    }
}

#[test]
fn a_full_pool_fails_writes_cleanly_and_recovers() {
    let vg = mem_vg("vg", &[64 * MIB], 4 * MIB);
    // 8 MiB of data: 128 blocks, for 64 MiB of virtual volumes (8x overcommitted).
    vg.create_pool("pool", 8 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "a", 32 * MIB).unwrap();
    vg.create_thin("pool", "b", 32 * MIB).unwrap();
    let usage = vg.pool("pool").unwrap().usage();
    assert_eq!(usage.data_blocks, 128);
    assert!(usage.overcommit > 7.9, "{usage:?}");
    let a = vg.open_lv("a", false).unwrap();
    let b = vg.open_lv("b", false).unwrap();
    write_blocks(&a, 0, 64, 1).unwrap();
    bq(&a).flush().unwrap();
    // Fill the rest with b until the pool refuses.
    let (full_at, e) = write_blocks(&b, 0, 200, 2).unwrap_err();
    assert!(matches!(e, StorageError::OutOfSpace(_)), "{e}");
    assert_eq!(full_at, 64, "64 blocks were left for b");
    // Nothing written is damaged; provisioned blocks still take writes; reads work.
    check_blocks(&a, 0, 64, 1);
    check_blocks(&b, 0, 64, 2);
    write_blocks(&a, 0, 64, 3).unwrap();
    check_blocks(&a, 0, 64, 3);
    assert!(matches!(
        write_blocks(&a, 100, 1, 0),
        Err((_, StorageError::OutOfSpace(_)))
    ));
    // Discard frees space for new writes.
    bq(&a).discard(32 * BLOCK, 32 * BLOCK).unwrap();
    assert_eq!(bq(&a).read_at(40 * BLOCK, 4096).unwrap(), vec![0u8; 4096]);
    write_blocks(&b, 64, 32, 2).unwrap();
    assert!(matches!(
        write_blocks(&b, 96, 1, 2),
        Err((_, StorageError::OutOfSpace(_)))
    ));
    // Extending the pool lets the refused writes through; earlier data is intact.
    vg.resize_lv("pool", 16 * MIB).unwrap();
    assert_eq!(vg.pool("pool").unwrap().usage().data_blocks, 256);
    write_blocks(&b, 96, 128, 2).unwrap();
    check_blocks(&a, 0, 32, 3);
    check_blocks(&b, 0, 224, 2);
    bq(&b).flush().unwrap();
    let check = vg.check().unwrap();
    assert!(check.is_clean(), "{check:?}");
}

#[test]
fn removing_a_volume_returns_its_blocks_and_usage_is_reported() {
    let vg = mem_vg("vg", &[64 * MIB], 4 * MIB);
    vg.create_pool("pool", 16 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "a", 16 * MIB).unwrap();
    let a = vg.open_lv("a", false).unwrap();
    write_blocks(&a, 0, 100, 1).unwrap();
    bq(&a).flush().unwrap();
    vg.snapshot("a", "s").unwrap();
    write_blocks(&a, 0, 50, 9).unwrap();
    let pool = vg.pool("pool").unwrap();
    assert_eq!(pool.usage().used_blocks, 150);
    assert_eq!(vg.lv_info("s").unwrap().mapped_bytes, Some(100 * BLOCK));
    drop(a);
    vg.remove_lv("a").unwrap();
    assert_eq!(
        pool.usage().used_blocks,
        100,
        "the snapshot keeps its 100 blocks"
    );
    vg.remove_lv("s").unwrap();
    assert_eq!(pool.usage().used_blocks, 0);
    assert!(vg.check().unwrap().is_clean());
}

#[test]
fn thin_metadata_survives_a_reopen() {
    let pv = mem_pv(64 * MIB);
    {
        let vg = Vg::create(
            "vg",
            vec![PvHandle::new(pv.clone() as SharedFile)],
            4 * MIB,
            VgOptions::default(),
        )
        .unwrap();
        vg.create_pool("pool", 32 * MIB, 0, 0).unwrap();
        vg.create_thin("pool", "a", 16 * MIB).unwrap();
        let a = vg.open_lv("a", false).unwrap();
        let mut q = bq(&a);
        for i in 0..300u64 {
            q.write_at(i * 4096 * 13 % (16 * MIB - 4096), &pattern(i, 4096))
                .unwrap();
        }
        q.flush().unwrap();
        vg.snapshot("a", "snap").unwrap();
        q.write_at(0, &[1u8; 4096]).unwrap();
        q.flush().unwrap();
        vg.resize_lv("a", 20 * MIB).unwrap();
    }
    let vg = Vg::open(
        vec![PvHandle::new(pv as SharedFile)],
        "vg",
        VgOptions::default(),
    )
    .unwrap();
    assert!(vg.check().unwrap().is_clean());
    let a = vg.open_lv("a", false).unwrap();
    assert_eq!(a.size(), 20 * MIB);
    let mut q = bq(&a);
    assert_eq!(q.read_at(0, 4096).unwrap(), vec![1u8; 4096]);
    let snap = vg.open_lv("snap", true).unwrap();
    let mut s = bq(&snap);
    let mut model = vec![0u8; 16 * MIB as usize];
    for i in 0..300u64 {
        let at = (i * 4096 * 13 % (16 * MIB - 4096)) as usize;
        model[at..at + 4096].copy_from_slice(&pattern(i, 4096));
    }
    assert_eq!(s.read_at(0, 16 * MIB as usize).unwrap(), model);
    model[..4096].fill(1);
    assert_eq!(q.read_at(0, 16 * MIB as usize).unwrap(), model);
}

#[test]
fn thin_block_size_and_sizes_are_checked() {
    let vg = mem_vg("vg", &[64 * MIB], 4 * MIB);
    for bad in [3000, 8 * MIB, 0x3000] {
        assert!(vg.create_pool("p", 16 * MIB, bad, 0).is_err(), "{bad}");
    }
    vg.create_pool("p", 16 * MIB, 128 << 10, 0).unwrap();
    assert_eq!(vg.pool("p").unwrap().block_size(), 128 << 10);
    assert!(vg.create_thin("p", "z", 0).is_err());
    vg.create_thin("p", "odd", 1000).unwrap();
    assert_eq!(
        vg.lv_info("odd").unwrap().size,
        128 << 10,
        "rounded up to a block"
    );
}
