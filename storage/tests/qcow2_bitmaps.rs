//! Persistent dirty bitmaps in the qcow2 bitmaps extension, made by qemu-img and qemu-io and read
//! by Strata: names, granularities and flags as `qemu-img info` shows them, the bits as QEMU
//! tracked them, a bitmap left in use by a killed QEMU reported as untrustworthy, and an image
//! Strata writes to without tracking flagging its enabled bitmaps in use while disabled ones stay
//! valid and `qemu-img check` stays clean. Change tracking in the image: bitmaps Strata adds and
//! bitmaps QEMU added record writes through Strata's tracked device, and after a clean close
//! QEMU's own NBD export (`qemu-nbd -B`, read by `nbdinfo --map`) reports exactly those regions
//! dirty; a writer that never closes leaves them in use and untrusted.

mod qcow2_support;

use std::path::Path;
use std::sync::Arc;

use qcow2_support::*;
use strata_storage::bitmap::bits::ranges;
use strata_storage::format::qcow2::bitmap_store::NewBitmap;
use strata_storage::format::OpenOptions;
use strata_storage::io::blocking::BlockingQueue;

const SIZE: u64 = 64 << 20;

fn make(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("a.qcow2");
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, &SIZE.to_string()],
    );
    run("qemu-img", &["bitmap", "--add", "-g", "65536", p, "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "524288", p, "coarse"],
    );
    run(
        "qemu-io",
        &[
            "-c",
            "write 0 1M",
            "-c",
            "write 10M 4k",
            "-c",
            "write 40M 600k",
            p,
        ],
    );
    path
}

fn bitmaps_qemu_made_read_back() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = make(dir.path());
    let img = open_q(&path, false);
    let list = img.bitmaps().unwrap();
    let names: Vec<(&str, u64, Vec<&str>)> = list
        .iter()
        .map(|b| (b.name.as_str(), b.granularity, b.flag_names()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("b0", 65536, vec!["auto"]),
            ("coarse", 524288, vec!["auto"])
        ]
    );
    let (_, words) = img.bitmap_words("b0").unwrap();
    assert_eq!(
        ranges(&words, 65536, SIZE),
        vec![
            (0, 1 << 20),
            (10 << 20, 65536),
            (40 << 20, 640 << 10) // 600 KiB rounded out to 64 KiB
        ]
    );
    let (_, words) = img.bitmap_words("coarse").unwrap();
    assert_eq!(
        ranges(&words, 524288, SIZE),
        vec![(0, 1 << 20), (10 << 20, 512 << 10), (40 << 20, 1 << 20)]
    );
    // `info` lists them as qemu-img does.
    let info = strata_storage::format::Image::info(img.as_ref()).unwrap();
    let b = &info.format_specific["bitmaps"];
    assert_eq!(b[0]["name"], "b0");
    assert_eq!(b[0]["granularity"], 65536);
    assert_eq!(b[0]["flags"][0], "auto");
    drop(img);
    // Disabled and merged by qemu-img: still read back.
    let p = path.to_str().unwrap();
    run("qemu-img", &["bitmap", "--disable", p, "coarse"]);
    run("qemu-img", &["bitmap", "--add", p, "merged"]);
    run("qemu-img", &["bitmap", "--merge", "b0", p, "merged"]);
    let img = open_q(&path, false);
    let list = img.bitmaps().unwrap();
    assert!(list[1].flag_names().is_empty(), "{list:?}");
    let (m, words) = img.bitmap_words("merged").unwrap();
    assert_eq!(
        ranges(&words, m.granularity, SIZE),
        vec![(0, 1 << 20), (10 << 20, 65536), (40 << 20, 640 << 10)]
    );
    assert!(img.bitmap_words("nope").is_err());
}

fn a_bitmap_left_in_use_is_not_trusted() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = make(dir.path());
    let p = path.to_str().unwrap();
    // qemu-io killed while the image is open with enabled bitmaps: they stay flagged in use.
    let (code, _) = run_status("qemu-io", &["-c", "write 20M 64k", "-c", "sigraise 9", p]);
    assert_ne!(code, 0);
    let img = open_q(&path, false);
    let list = img.bitmaps().unwrap();
    assert!(list.iter().all(|b| b.in_use), "{list:?}");
    assert_eq!(list[0].flag_names(), vec!["in-use", "auto"]);
    let e = img.bitmap_words("b0").unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
}

fn strata_writes_flag_enabled_bitmaps_in_use() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = make(dir.path());
    let p = path.to_str().unwrap();
    run("qemu-img", &["bitmap", "--disable", p, "coarse"]);
    {
        let img = open_q(&path, true);
        // Opened for writing: the enabled bitmap is flagged in use before any write (Strata
        // does not record its writes there); the disabled one, which no write changes, is not.
        let list = img.bitmaps().unwrap();
        assert_eq!(list[0].flag_names(), vec!["in-use", "auto"]);
        assert!(list[1].flag_names().is_empty(), "{list:?}");
        let mut model = qemu_raw(&path, dir.path());
        apply(img.as_ref(), &workload(SIZE, 50, 5), &mut model);
        strata_storage::BlockDevice::flush(img.as_ref()).unwrap();
    }
    let info = run("qemu-img", &["info", "--output=json", p]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let bitmaps = &v["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "b0", "{info}");
    assert_eq!(bitmaps[0]["flags"][0], "in-use", "{info}");
    assert_eq!(bitmaps[1]["name"], "coarse", "{info}");
    assert_eq!(
        bitmaps[1]["flags"].as_array().map(Vec::len),
        Some(0),
        "{info}"
    );
    assert_qemu_check_clean(&path);
    // The disabled bitmap's bits are still QEMU's.
    let img = open_q(&path, false);
    let (_, words) = img.bitmap_words("coarse").unwrap();
    assert_eq!(
        ranges(&words, 524288, SIZE),
        vec![(0, 1 << 20), (10 << 20, 512 << 10), (40 << 20, 1 << 20)]
    );
    drop(img);
    // qemu-img removes the inconsistent one as it would its own.
    run("qemu-img", &["bitmap", "--remove", p, "b0"]);
    assert_qemu_check_clean(&path);
}

fn bitmaps_strata_writes_are_qemus() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = make(dir.path());
    let p = path.to_str().unwrap();
    // Bits of a 128 KiB-granularity bitmap: granules 0..8, 100 and the last one.
    let granules = SIZE / (128 << 10);
    let mut words = vec![0u64; granules.div_ceil(64) as usize];
    for g in (0..8).chain([100, granules - 1]) {
        words[(g / 64) as usize] |= 1 << (g % 64);
    }
    {
        let img = open_q(&path, true);
        img.bitmap_add(&NewBitmap {
            name: "strata",
            granularity: 128 << 10,
            words: &words,
            flags: 0,
        })
        .unwrap();
        let e = img
            .bitmap_add(&NewBitmap {
                name: "strata",
                granularity: 65536,
                words: &words,
                flags: 0,
            })
            .unwrap_err();
        assert!(e.to_string().contains("strata"), "{e}");
    }
    assert_qemu_check_clean(&path);
    let info = run("qemu-img", &["info", "--output=json", p]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let b = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .clone();
    let ours = b.iter().find(|x| x["name"] == "strata").expect("listed");
    assert_eq!(ours["granularity"], 128 << 10, "{info}");
    assert_eq!(ours["flags"].as_array().map(Vec::len), Some(0), "{info}");
    // QEMU's own bitmaps were kept (flagged in use by the writable open, as they went stale).
    assert!(b.iter().any(|x| x["name"] == "b0"), "{info}");
    // QEMU reads our bits: merging them into a fresh bitmap of its own and reading that back.
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "131072", "--disable", p, "copy"],
    );
    run("qemu-img", &["bitmap", "--merge", "strata", p, "copy"]);
    run("qemu-img", &["bitmap", "--enable", p, "strata"]);
    run("qemu-img", &["bitmap", "--disable", p, "strata"]);
    assert_qemu_check_clean(&path);
    let img = open_q(&path, false);
    let (_, got) = img.bitmap_words("copy").unwrap();
    assert_eq!(got, words, "qemu's copy of Strata's bitmap");
    let (_, got) = img.bitmap_words("strata").unwrap();
    assert_eq!(got, words);
    drop(img);
    // Removing ours leaves the file clean, and qemu's bitmaps as they were.
    open_q(&path, true).bitmap_remove("strata").unwrap();
    assert_qemu_check_clean(&path);
    let img = open_q(&path, false);
    let names: Vec<String> = img.bitmaps().unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, vec!["b0", "coarse", "copy"]);
    let (_, got) = img.bitmap_words("copy").unwrap();
    assert_eq!(got, words);
}

/// The dirty ranges of bitmap `name` as QEMU exports them (`qemu-nbd -B`, `nbdinfo --map`).
fn qemu_dirty(path: &Path, name: &str) -> Vec<(u64, u64)> {
    strata_testkit::qemu_dirty_ranges(path, name)
}

/// Opens `path` for writing as the VMM and NBD server do: with its bitmaps attached.
fn open_tracked(path: &Path) -> strata_storage::bitmap::WithBitmaps {
    let img = strata_storage::format::open_image(path, &OpenOptions::default()).unwrap();
    strata_storage::bitmap::attach_image_bitmaps(img, path).unwrap()
}

fn bitmap_flags(path: &Path, name: &str) -> Vec<String> {
    let info = run(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let list = v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let b = list
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no bitmap {name}: {info}"));
    b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

const G: u64 = 64 << 10;

fn strata_tracks_writes_in_its_own_qcow2_bitmap() {
    strata_testkit::require_qemu_utils();
    strata_testkit::require_tool("nbdinfo", "libnbd-bin");
    strata_testkit::require_tool("qemu-nbd", "qemu-utils");
    let dir = tempdir();
    let path = dir.path().join("t.qcow2");
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p, &SIZE.to_string()],
    );
    {
        // Added as `strata image bitmap add` does: an enabled bitmap in the image.
        let img = open_q(&path, true);
        let set = strata_storage::bitmap::BitmapSet::open_in_image(img, &path).unwrap();
        set.add("backup", G).unwrap();
        set.save().unwrap();
    }
    assert_eq!(bitmap_flags(&path, "backup"), vec!["auto"]);
    assert!(
        !strata_storage::bitmap::sidecar_path(&path).exists(),
        "no sidecar for a qcow2 image"
    );
    assert_eq!(qemu_dirty(&path, "backup"), vec![]);
    {
        let t = open_tracked(&path);
        assert!(t.bitmaps().is_some());
        // Flagged in use before the first write.
        assert_eq!(bitmap_flags(&path, "backup"), vec!["in-use", "auto"]);
        let mut q = BlockingQueue::open(t.device().as_ref(), 8).unwrap();
        q.write_at(G + 10, &[1u8; 10]).unwrap();
        q.write_at(5 * G - 1, &[1u8; 2]).unwrap();
        q.discard(10 * G, 2 * G).unwrap();
        q.write_at(SIZE - 4096, &[7u8; 4096]).unwrap();
        q.read_at(20 * G, 4096).unwrap();
        q.flush().unwrap();
    }
    // A clean close: consistent, exactly the written granules dirty, and the file clean.
    assert_eq!(bitmap_flags(&path, "backup"), vec!["auto"]);
    assert_qemu_check_clean(&path);
    let want = vec![(G, G), (4 * G, 2 * G), (10 * G, 2 * G), (SIZE - G, G)];
    assert_eq!(qemu_dirty(&path, "backup"), want);
    // A second session adds to the bits.
    {
        let t = open_tracked(&path);
        let mut q = BlockingQueue::open(t.device().as_ref(), 8).unwrap();
        q.write_at(30 * G, &[2u8; 512]).unwrap();
    }
    let mut want2 = want.clone();
    want2.insert(3, (30 * G, G));
    assert_eq!(qemu_dirty(&path, "backup"), want2);
    assert_qemu_check_clean(&path);
    // Taken for a backup (read and restarted): the image's bitmap is empty again.
    {
        let t = open_tracked(&path);
        let taken = t.bitmaps().unwrap().take("backup").unwrap();
        assert!(taken.valid);
        assert_eq!(taken.dirty_ranges(), want2);
    }
    assert_eq!(qemu_dirty(&path, "backup"), vec![]);
    // A resize would leave the bitmap's table the wrong size: refused while it exists.
    {
        let img = open_q(&path, true);
        let e = img.resize_image(2 * SIZE, false).unwrap_err();
        assert!(e.to_string().contains("persistent dirty bitmaps"), "{e}");
    }
    assert_qemu_check_clean(&path);
    // Removed: gone from the image, file clean.
    {
        let img = open_q(&path, true);
        let set = strata_storage::bitmap::BitmapSet::open_in_image(img, &path).unwrap();
        set.remove("backup").unwrap();
    }
    let info = run("qemu-img", &["info", "--output=json", p]);
    assert!(!info.contains("\"backup\""), "{info}");
    assert_qemu_check_clean(&path);
    open_q(&path, true).resize_image(2 * SIZE, false).unwrap();
    assert_qemu_check_clean(&path);
}

fn qemus_enabled_bitmap_stays_valid_across_a_strata_session() {
    strata_testkit::require_qemu_utils();
    strata_testkit::require_tool("nbdinfo", "libnbd-bin");
    strata_testkit::require_tool("qemu-nbd", "qemu-utils");
    let dir = tempdir();
    let path = make(dir.path());
    let p = path.to_str().unwrap();
    run("qemu-img", &["bitmap", "--disable", p, "coarse"]);
    {
        let t = open_tracked(&path);
        let mut q = BlockingQueue::open(t.device().as_ref(), 8).unwrap();
        q.write_at(20 << 20, &[3u8; 4096]).unwrap();
        q.write_at((50 << 20) + 100, &[3u8; 100]).unwrap();
    }
    assert_eq!(bitmap_flags(&path, "b0"), vec!["auto"]);
    assert!(bitmap_flags(&path, "coarse").is_empty());
    assert_qemu_check_clean(&path);
    // QEMU's writes from before, and Strata's now.
    assert_eq!(
        qemu_dirty(&path, "b0"),
        vec![
            (0, 1 << 20),
            (10 << 20, G),
            (20 << 20, G),
            (40 << 20, 640 << 10),
            (50 << 20, G)
        ]
    );
    // The disabled bitmap is QEMU's, untouched.
    assert_eq!(
        qemu_dirty(&path, "coarse"),
        vec![(0, 1 << 20), (10 << 20, 512 << 10), (40 << 20, 1 << 20)]
    );
}

fn a_killed_strata_writer_leaves_its_bitmap_untrusted() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = make(dir.path());
    {
        let t = open_tracked(&path);
        let mut q = BlockingQueue::open(t.device().as_ref(), 8).unwrap();
        q.write_at(20 << 20, &[3u8; 4096]).unwrap();
        q.flush().unwrap();
        drop(q);
        // The process dies with the image open: no close runs.
        std::mem::forget(t);
    }
    assert_eq!(bitmap_flags(&path, "b0"), vec!["in-use", "auto"]);
    let img = open_q(&path, false);
    let e = img.bitmap_words("b0").unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop(img);
    // Through the tracking layer (the forgotten writer still holds the image's lock in this
    // process, so without it): invalid, so a backup from it must copy everything, and a clean
    // close does not make it trusted again.
    {
        let img = open_q(&path, true);
        let set =
            Arc::new(strata_storage::bitmap::BitmapSet::open_in_image(img.clone(), &path).unwrap());
        assert!(!set.info("b0").unwrap().valid);
        assert!(!set.info("coarse").unwrap().valid);
        let t: Arc<dyn strata_storage::BlockDevice> =
            Arc::new(strata_storage::bitmap::TrackedDevice::with_set(img, set.clone()).unwrap());
        let mut q = BlockingQueue::open(t.as_ref(), 8).unwrap();
        q.write_at(0, &[1u8; 512]).unwrap();
    }
    assert_eq!(bitmap_flags(&path, "b0"), vec!["in-use", "auto"]);
    assert_qemu_check_clean(&path);
}

/// A bitmap table is untrusted: one whose entry names the image's L1 table is removed without
/// releasing that cluster (qemu-img check finds at most the leaked data cluster, not an L1
/// table with refcount 0 that the next allocation would overwrite).
fn removing_a_bitmap_whose_table_names_the_l1_table_frees_no_metadata() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let path = make(dir.path());
    let b0 = open_q(&path, false)
        .bitmaps()
        .unwrap()
        .into_iter()
        .find(|b| b.name == "b0")
        .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let l1 = strata_storage::bytes::be64(&bytes, 40);
    let at = b0.table_offset as usize;
    bytes[at..at + 8].copy_from_slice(&l1.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();

    open_q(&path, true).bitmap_remove("b0").unwrap();
    let (code, out) = run_status("qemu-img", &["check", path.to_str().unwrap()]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check after removing the bitmap (exit {code}):\n{out}"
    );
    let (code, out) = run_status(
        "qemu-io",
        &["-c", "read -P 0xcd 0 1M", path.to_str().unwrap()],
    );
    assert_eq!(code, 0, "the guest data is gone:\n{out}");
}

strata_testkit::main!(
    strata_tracks_writes_in_its_own_qcow2_bitmap,
    qemus_enabled_bitmap_stays_valid_across_a_strata_session,
    a_killed_strata_writer_leaves_its_bitmap_untrusted,
    bitmaps_strata_writes_are_qemus,
    bitmaps_qemu_made_read_back,
    a_bitmap_left_in_use_is_not_trusted,
    strata_writes_flag_enabled_bitmaps_in_use,
    removing_a_bitmap_whose_table_names_the_l1_table_frees_no_metadata,
);
