//! Malformed input never panics: every parser of on-disk volume structures (labels, metadata
//! slots and JSON, thin superblocks, nodes and device tables, bitmap files) is fed thousands of
//! randomly damaged copies of valid ones, and whole PV images with damaged metadata are opened,
//! checked and read. Errors are expected; panics, hangs and huge allocations are not.

mod volume_util;

use std::sync::Arc;

use strata_storage::bitmap::BitmapSet;
use strata_storage::io::memory::MemoryDevice;
use strata_storage::volume::label::{read_label, MDA_OFFSET, MDA_SLOT_SIZE, PE_START};
use strata_storage::volume::meta::VgMeta;
use strata_storage::volume::thin::format::{
    decode_table, encode_table, pack, DevEntry, Node, Superblock,
};
use strata_storage::volume::{mda, PvHandle, Vg, VgOptions};
use strata_storage::{HostFile, SharedFile};
use volume_util::*;

/// Flips, overwrites or zeroes a few random bytes (or a 64-bit field) of `data`.
fn mutate(rng: &mut fastrand::Rng, data: &mut [u8]) {
    for _ in 0..rng.usize(1..6) {
        let at = rng.usize(..data.len());
        match rng.u8(..4) {
            0 => data[at] ^= 1 << rng.u8(..8),
            1 => data[at] = rng.u8(..),
            2 => {
                let end = (at + 8).min(data.len());
                data[at..end].fill(0xff);
            }
            _ => {
                let end = (at + rng.usize(1..64)).min(data.len());
                data[at..end].fill(0);
            }
        }
    }
}

#[test]
fn damaged_thin_metadata_blocks_are_refused_without_panicking() {
    let sb = Superblock {
        seq: 9,
        pool_uuid: "0123456789abcdef0123456789abcdef".into(),
        block_size: 65536,
        data_blocks: 1000,
        meta_blocks: 256,
        used_data: 10,
        used_meta: 5,
        device_count: 2,
        next_id: 3,
        zero_from: 500,
        chunks: vec![7],
    }
    .encode();
    let mut node = Node::new(0);
    for k in 0..200u64 {
        node.keys.push(k * 3);
        node.vals.push(pack(k, 4));
    }
    let node = node.encode(12, 9);
    let entry = DevEntry {
        id: 1,
        flags: 0,
        size: 1 << 30,
        root: 12,
        mapped: 200,
        created: 0,
        origin: None,
        name: "vm-1-disk-0".into(),
    };
    let table = encode_table(
        &[
            entry.clone(),
            DevEntry {
                id: 2,
                name: "b".into(),
                ..entry
            },
        ],
        7,
        9,
    );
    let mut rng = fastrand::Rng::with_seed(1);
    for _ in 0..5000 {
        let mut b = sb.clone();
        mutate(&mut rng, &mut b);
        let _ = Superblock::decode(&b, 1, "fuzz");
        let mut b = node.clone();
        mutate(&mut rng, &mut b);
        let _ = Node::decode(&b, 12, 9, "fuzz");
        let mut b = table.clone();
        mutate(&mut rng, &mut b);
        let _ = decode_table(&b, 7, 9, "fuzz");
    }
}

#[test]
fn damaged_labels_slots_and_group_metadata_are_refused_without_panicking() {
    let vg = mem_vg("vg", &[16 * MIB, 16 * MIB], MIB);
    vg.create_linear("a", 3 * MIB, &[]).unwrap();
    vg.create_pool("p", 8 * MIB, 0, 0).unwrap();
    let json = vg.metadata().encode();
    let pv = mem_pv(4 * MIB);
    let mut label = vec![0u8; 8192];
    pv.read_exact_at(0, &mut label).unwrap();
    let mut rng = fastrand::Rng::with_seed(2);
    for _ in 0..3000 {
        let mut j = json.clone();
        mutate(&mut rng, &mut j);
        if let Ok(m) = VgMeta::decode(&j, "fuzz") {
            m.validate().unwrap();
        }
        let dev = MemoryDevice::new(PE_START + 4 * MIB);
        let mut l = label.clone();
        mutate(&mut rng, &mut l);
        dev.write_all_at(0, &l).unwrap();
        if let Ok(r) = read_label(dev.as_ref()) {
            let _ = mda::read_area(dev.as_ref(), &r.label);
        }
    }
}

#[test]
fn damaged_bitmap_files_are_refused_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.bitmaps");
    {
        let s = BitmapSet::open(&p, 64 * MIB).unwrap();
        s.add("a", 65536).unwrap();
        s.add("b", 4096).unwrap();
        s.mark(12345, 99999);
        s.save().unwrap();
    }
    let good = std::fs::read(&p).unwrap();
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..800 {
        let mut b = good.clone();
        mutate(&mut rng, &mut b);
        std::fs::write(&p, &b).unwrap();
        if let Ok(s) = BitmapSet::open(&p, 64 * MIB) {
            for i in s.infos() {
                let _ = s.dirty_ranges(&i.name);
            }
        }
    }
}

/// Whole PVs with damage in their metadata areas or in the thin pool's metadata volume: the
/// group either refuses to open with an error, or opens, checks and reads without panicking.
#[test]
fn damaged_pv_images_open_check_and_read_without_panicking() {
    let pv = mem_pv(32 * MIB);
    {
        let vg = Vg::create(
            "vg",
            vec![PvHandle::new(pv.clone() as SharedFile)],
            MIB,
            VgOptions::default(),
        )
        .unwrap();
        vg.create_pool("pool", 16 * MIB, 0, MIB).unwrap();
        vg.create_thin("pool", "t", 8 * MIB).unwrap();
        let t = vg.open_lv("t", false).unwrap();
        let mut q = bq(&t);
        for i in 0..60u64 {
            q.write_at(i * 65536 * 2, &pattern(i, 4096)).unwrap();
        }
        q.flush().unwrap();
        vg.snapshot("t", "s").unwrap();
    }
    let mut image = vec![0u8; (PE_START + 32 * MIB) as usize];
    pv.read_exact_at(0, &mut image).unwrap();
    // The pool's metadata volume is the first extent after the group's start.
    let regions = [
        (0usize, 8192usize),
        (MDA_OFFSET as usize, (2 * MDA_SLOT_SIZE) as usize),
        (PE_START as usize, MIB as usize),
    ];
    let written: Vec<usize> = (0..image.len() / 65536)
        .filter(|&i| image[i * 65536..(i + 1) * 65536].iter().any(|&b| b != 0))
        .collect();
    let mut rng = fastrand::Rng::with_seed(4);
    let mut opened = 0;
    for round in 0..150 {
        let dev = MemoryDevice::new(image.len() as u64);
        for &i in &written {
            dev.write_all_at(i as u64 * 65536, &image[i * 65536..(i + 1) * 65536])
                .unwrap();
        }
        // Damage inside the interesting bytes: the used part of the region.
        let (start, len) = regions[round % regions.len()];
        let used = if start == PE_START as usize {
            64 * 4096
        } else {
            len.min(16384)
        };
        let mut damaged = image[start..start + used].to_vec();
        mutate(&mut rng, &mut damaged);
        dev.write_all_at(start as u64, &damaged).unwrap();
        let dev: Arc<dyn HostFile> = dev;
        let Ok(vg) = Vg::open(vec![PvHandle::new(dev)], "vg", VgOptions::default()) else {
            continue;
        };
        opened += 1;
        let _ = vg.check();
        if let Ok(lvs) = vg.list_lvs() {
            for l in lvs {
                if let Ok(d) = vg.open_lv(&l.name, true) {
                    let _ = bq(&d).read_at(0, d.size().min(MIB) as usize);
                }
            }
        }
    }
    assert!(
        opened > 0,
        "no damaged image opened at all: the test damaged too much"
    );
}
