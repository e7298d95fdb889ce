//! Volume groups and linear volumes: create, grow, shrink, rename, remove, extend and reduce,
//! reopen; damaged labels and metadata (one copy, both copies), a missing PV, bad names; and
//! two processes (here: two handles) on one group through the devices file.

mod volume_util;

use std::sync::Arc;

use strata_storage::io::memory::MemoryDevice;
use strata_storage::volume::label::{LABEL_SIZE, MDA_OFFSET, MDA_SLOT_SIZE, PE_START};
use strata_storage::volume::{PvHandle, Vg, VgOptions, VolumeStore};
use strata_storage::{HostFile, SharedFile, StorageError};
use volume_util::*;

fn handles(pvs: &[Arc<MemoryDevice>]) -> Vec<PvHandle> {
    pvs.iter()
        .map(|p| PvHandle::new(p.clone() as SharedFile))
        .collect()
}

fn open(pvs: &[Arc<MemoryDevice>]) -> strata_storage::Result<Vg> {
    Vg::open(handles(pvs), "vg", VgOptions::default())
}

#[test]
fn linear_volumes_grow_shrink_rename_and_persist() {
    let pvs = [mem_pv(16 * MIB), mem_pv(16 * MIB)];
    let vg = Vg::create("vg", handles(&pvs), 4 * MIB, VgOptions::default()).unwrap();
    vg.create_linear("a", 6 * MIB, &[0]).unwrap();
    assert_eq!(
        vg.lv_info("a").unwrap().size,
        8 * MIB,
        "rounded up to extents"
    );
    let a = vg.open_lv("a", false).unwrap();
    bq(&a).write_at(MIB, &pattern(1, 4096)).unwrap();
    // Grow across PVs while open: the open device sees the new size at once.
    vg.create_linear("b", 8 * MIB, &[0]).unwrap();
    a.resize(20 * MIB).unwrap();
    assert_eq!(a.size(), 20 * MIB);
    assert_eq!(vg.lv_info("a").unwrap().segments, Some(2));
    let mut q = bq(&a);
    q.write_at(19 * MIB, &pattern(2, 8192)).unwrap();
    assert_eq!(q.read_at(MIB, 4096).unwrap(), pattern(1, 4096));
    assert_eq!(
        q.read_at(12 * MIB, 4096).unwrap(),
        vec![0u8; 4096],
        "grown extents read as zeros"
    );
    assert!(
        vg.create_linear("c", 8 * MIB, &[]).is_err(),
        "the group is full"
    );
    drop((q, a));
    vg.rename_lv("a", "a2").unwrap();
    vg.resize_lv("a2", 16 * MIB).unwrap();
    vg.remove_lv("b").unwrap();
    drop(vg);
    let vg = open(&pvs).unwrap();
    let a = vg.open_lv("a2", false).unwrap();
    assert_eq!(a.size(), 16 * MIB);
    assert_eq!(bq(&a).read_at(MIB, 4096).unwrap(), pattern(1, 4096));
    assert!(vg.open_lv("a", false).is_err());
    assert_eq!(vg.info().free, 16 * MIB);
    assert!(vg.check().unwrap().is_clean());
}

#[test]
fn groups_extend_and_reduce() {
    let pvs = [mem_pv(8 * MIB), mem_pv(8 * MIB), mem_pv(8 * MIB)];
    let vg = Vg::create("vg", handles(&pvs[..1]), 4 * MIB, VgOptions::default()).unwrap();
    vg.extend(handles(&pvs[1..])).unwrap();
    assert_eq!(vg.info().pvs.len(), 3);
    vg.create_linear("x", 4 * MIB, &[2]).unwrap();
    let x = vg.open_lv("x", false).unwrap();
    bq(&x).write_at(0, b"on the third").unwrap();
    drop(x);
    let busy = vg.reduce(&vg.info().pvs[2].uuid).unwrap_err();
    assert!(matches!(busy, StorageError::Busy(_)), "{busy}");
    let uuid1 = vg.info().pvs[1].uuid.clone();
    vg.reduce(&uuid1).unwrap();
    assert_eq!(vg.info().pvs.len(), 2);
    assert_eq!(
        bq(&vg.open_lv("x", false).unwrap()).read_at(0, 12).unwrap(),
        b"on the third"
    );
    // The reduced PV can start a new group; a PV already in a group cannot.
    assert!(Vg::create("other", handles(&pvs[..1]), 0, VgOptions::default()).is_err());
    Vg::create("other", handles(&pvs[1..2]), 0, VgOptions::default()).unwrap();
    drop(vg);
    let vg = Vg::open(handles(&pvs), "vg", VgOptions::default()).unwrap();
    assert_eq!(
        bq(&vg.open_lv("x", false).unwrap()).read_at(0, 12).unwrap(),
        b"on the third"
    );
    assert!(vg.clone().remove().is_err(), "a group with volumes");
    vg.remove_lv("x").unwrap();
    vg.remove().unwrap();
    assert!(open(&pvs[..1]).is_err());
}

#[test]
fn one_damaged_copy_of_label_or_metadata_loses_nothing() {
    let pvs = [mem_pv(16 * MIB), mem_pv(16 * MIB)];
    let vg = Vg::create("vg", handles(&pvs), 4 * MIB, VgOptions::default()).unwrap();
    vg.create_linear("a", 20 * MIB, &[]).unwrap();
    bq(&vg.open_lv("a", false).unwrap())
        .write_at(0, b"keep me")
        .unwrap();
    drop(vg);
    // Damage label copy 0 of PV 0 and metadata copy 1 of PV 1, and copy 0 of PV 0.
    pvs[0].write_all_at(20, b"xxxx").unwrap();
    pvs[1]
        .write_all_at(MDA_OFFSET + MDA_SLOT_SIZE + 100, b"rot")
        .unwrap();
    pvs[0].write_all_at(MDA_OFFSET + 70, b"rot").unwrap();
    let vg = open(&pvs).unwrap();
    assert_eq!(
        bq(&vg.open_lv("a", false).unwrap()).read_at(0, 7).unwrap(),
        b"keep me"
    );
    // Opening for writing repaired every copy.
    let c = vg.check().unwrap();
    assert!(c.is_clean() && c.warnings.is_empty(), "{c:?}");
}

#[test]
fn both_copies_damaged_or_a_missing_pv_are_clear_errors_that_change_nothing() {
    let pvs = [mem_pv(16 * MIB), mem_pv(16 * MIB)];
    let vg = Vg::create("vg", handles(&pvs), 4 * MIB, VgOptions::default()).unwrap();
    vg.create_linear("a", 20 * MIB, &[]).unwrap();
    drop(vg);
    // A missing PV: refused, naming it; the other PV is untouched.
    let before = pvs[0].read_all_for_test();
    let e = open(&pvs[..1]).unwrap_err().to_string();
    assert!(
        e.contains("missing PV") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(pvs[0].read_all_for_test(), before);
    // Both metadata copies of both PVs damaged.
    let saved: Vec<Vec<u8>> = pvs
        .iter()
        .map(|p| p.read_range(MDA_OFFSET, 2 * MDA_SLOT_SIZE))
        .collect();
    for p in &pvs {
        p.write_all_at(MDA_OFFSET + 80, b"rot").unwrap();
        p.write_all_at(MDA_OFFSET + MDA_SLOT_SIZE + 80, b"rot")
            .unwrap();
    }
    let e = open(&pvs).unwrap_err().to_string();
    assert!(
        e.contains("volume group vg") && e.contains("does not exist"),
        "{e}"
    );
    for (p, s) in pvs.iter().zip(&saved) {
        p.write_all_at(MDA_OFFSET, s).unwrap();
    }
    open(&pvs).unwrap();
    // Both label copies of one PV damaged: that PV cannot be identified, so it is missing.
    pvs[1].write_all_at(20, b"xxxx").unwrap();
    pvs[1]
        .write_all_at(LABEL_SIZE as u64 + 20, b"xxxx")
        .unwrap();
    let e = open(&pvs).unwrap_err().to_string();
    assert!(e.contains("missing PV"), "{e}");
    let _ = PE_START;
}

#[test]
fn bad_names_are_refused() {
    let vg = mem_vg("vg", &[16 * MIB], 4 * MIB);
    let long = "n".repeat(200);
    for bad in [
        "a/b",
        "..",
        ".",
        "x\u{7}y",
        "-x",
        "sp ace",
        long.as_str(),
        "",
        "p_tmeta",
    ] {
        let e = vg.create_linear(bad, MIB, &[]).unwrap_err();
        assert!(matches!(e, StorageError::InvalidInput(_)), "{bad:?}: {e}");
        assert!(vg.create_pool(bad, 4 * MIB, 0, 0).is_err());
    }
    for bad in ["a/b", "..", long.as_str()] {
        assert!(Vg::create(
            bad,
            vec![PvHandle::new(mem_pv(8 * MIB) as SharedFile)],
            0,
            VgOptions::default()
        )
        .is_err());
    }
    assert!(vg.list_lvs().unwrap().is_empty());
}

#[test]
fn the_devices_file_finds_groups_and_a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = VolumeStore::new(&dir.path().join("data"));
    let p1 = dir.path().join("pv1");
    let p2 = dir.path().join("pv2");
    store.pv_create(&p1, Some(64 * MIB)).unwrap();
    store.pv_create(&p2, Some(64 * MIB)).unwrap();
    assert!(store.pv_create(&p1, None).is_err(), "already a PV");
    let vg = store
        .vg_create("vg0", std::slice::from_ref(&p1), 0)
        .unwrap();
    vg.create_pool("pool", 32 * MIB, 0, 0).unwrap();
    vg.create_thin("pool", "t", 8 * MIB).unwrap();
    // The group is locked: another open (as another process would do) is refused clearly.
    let e = store.open_vg("vg0", false).unwrap_err();
    assert!(matches!(e, StorageError::Busy(_)), "{e}");
    assert!(e.to_string().contains("volume group vg0"), "{e}");
    assert!(
        store.open_vg("vg0", true).is_err(),
        "not even shared while held exclusively"
    );
    store.vg_extend(&vg, std::slice::from_ref(&p2)).unwrap();
    drop(vg);
    let list = store.vg_list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].pv_count, 2);
    let ro1 = store.open_vg("vg0", true).unwrap();
    let ro2 = store.open_vg("vg0", true).unwrap();
    assert_eq!(ro1.list_lvs().unwrap().len(), 2);
    assert!(ro2.create_linear("x", MIB, &[]).is_err(), "read-only");
    assert!(store.open_vg("vg0", false).is_err());
    drop((ro1, ro2));
    let vg = store.open_vg("vg0", false).unwrap();
    assert!(vg.check().unwrap().is_clean());
    // A PV listed in the devices file that has gone is reported, and the group is missing a PV.
    drop(vg);
    std::fs::remove_file(&p2).unwrap();
    let e = store.open_vg("vg0", false).unwrap_err().to_string();
    assert!(e.contains("missing PV"), "{e}");
    let pvs = store.pv_list().unwrap();
    assert!(pvs.iter().any(|p| p.problem.is_some()));
}

trait ReadAll {
    fn read_all_for_test(&self) -> Vec<u8>;
    fn read_range(&self, offset: u64, len: u64) -> Vec<u8>;
}

impl ReadAll for MemoryDevice {
    fn read_all_for_test(&self) -> Vec<u8> {
        self.read_range(0, self.len())
    }

    fn read_range(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.read_exact_at(offset, &mut v).unwrap();
        v
    }
}
