//! Persistent dirty bitmaps in the qcow2 bitmaps extension, made by qemu-img and qemu-io and read
//! by Strata: names, granularities and flags as `qemu-img info` shows them, the bits as QEMU
//! tracked them, a bitmap left in use by a killed QEMU reported as untrustworthy, and an image
//! Strata writes to flagging its enabled bitmaps in use (Strata does not record writes there)
//! while disabled ones stay valid and `qemu-img check` stays clean.

mod qcow2_support;

use std::path::Path;
use std::sync::Arc;

use qcow2_support::*;
use strata_storage::bitmap::bits::ranges;
use strata_storage::format::qcow2::bitmap_store::NewBitmap;
use strata_storage::format::qcow2::{self, Qcow2Image, Qcow2Options};
use strata_storage::format::{open_host_file, OpenOptions};

const SIZE: u64 = 64 << 20;

fn open_q(path: &Path, writable: bool) -> Arc<Qcow2Image> {
    let file = open_host_file(
        path,
        &OpenOptions {
            read_only: !writable,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    qcow2::open(file, &Qcow2Options::default()).unwrap()
}

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
        })
        .unwrap();
        let e = img
            .bitmap_add(&NewBitmap {
                name: "strata",
                granularity: 65536,
                words: &words,
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

strata_testkit::main!(
    bitmaps_strata_writes_are_qemus,
    bitmaps_qemu_made_read_back,
    a_bitmap_left_in_use_is_not_trusted,
    strata_writes_flag_enabled_bitmaps_in_use,
);
