//! qcow2 images with an external data file (`data_file`, `data_file_raw`), against qemu-img:
//! images qemu-img makes read back exactly and stay `qemu-img check` clean and `compare` equal
//! after Strata writes to them; images Strata makes read back in qemu-img, with the data in the
//! data file at the guest offsets (and, with `data_file_raw`, the data file equal to the disk);
//! appliance-style opens (references refused) never open the data file.

mod qcow2_support;

use std::collections::BTreeMap;
use std::path::Path;

use qcow2_support::*;
use strata_storage::convert::{convert_to_new_image, ConvertOptions, NewImage, NoProgress};
use strata_storage::format::{self, ImageFormat, OpenOptions, References};
use strata_storage::StorageError;

const SIZE: u64 = 8 << 20;

fn qemu_create(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            path.to_str().unwrap(),
            &SIZE.to_string(),
        ],
    );
    path
}

fn strata_create(dir: &Path, name: &str, opts: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join(name);
    let map: BTreeMap<String, String> = opts
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    format::create_image(&path, ImageFormat::Qcow2, SIZE, &map).unwrap();
    path
}

fn qemu_info(path: &Path) -> serde_json::Value {
    let out = run(
        "qemu-img",
        &["info", "--output=json", "-U", path.to_str().unwrap()],
    );
    serde_json::from_str(&out).unwrap()
}

fn images_qemu_img_makes_read_and_write() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    // qemu-img 7.2 resolves a relative data file name against its working directory, Strata
    // against the image's folder (as backing files): absolute names mean the same to both.
    for (i, (name, extra)) in [
        ("plain", ""),
        ("raw", ",data_file_raw=on"),
        ("ext", ",extended_l2=on"),
        ("c4k", ",cluster_size=4096"),
    ]
    .into_iter()
    .enumerate()
    {
        let data_path = d.join(format!("{name}.data"));
        let opts = format!("data_file={}{extra}", data_path.display());
        let opts = opts.as_str();
        let path = qemu_create(d, &format!("{name}.qcow2"), opts);
        qemu_io_fill(&path, SIZE, 50 + i as u64, "qcow2");
        let want = qemu_raw(&path, d);
        assert_same(
            &read_all(open(&path, false).as_ref()),
            &want,
            &format!("{name}: qemu's image read by Strata"),
        );
        let model = write_and_verify(&path, d, 500 + i as u64, name);
        if name == "raw" {
            // The raw data file is the disk itself.
            let data = std::fs::read(&data_path).unwrap();
            assert_same(&data, &model, "raw data file after Strata's writes");
        }
        let info = open(&path, false).info().unwrap();
        let data_file = data_path.display().to_string();
        assert_eq!(
            info.format_specific
                .get("data-file")
                .and_then(|v| v.as_str()),
            Some(data_file.as_str()),
            "{name}: info names the data file"
        );
    }
}

fn images_strata_makes_read_in_qemu() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    for (i, (name, raw)) in [("s-plain", false), ("s-raw", true)]
        .into_iter()
        .enumerate()
    {
        let data_name = d.join(format!("{name}.data")).display().to_string();
        let mut opts = vec![("data_file", data_name.as_str())];
        if raw {
            opts.push(("data_file_raw", "on"));
        }
        let path = strata_create(d, &format!("{name}.qcow2"), &opts);
        assert_qemu_check_clean(&path);
        let info = qemu_info(&path);
        let data = &info["format-specific"]["data"];
        assert_eq!(data["data-file"], data_name.as_str(), "{info}");
        assert_eq!(data["data-file-raw"], raw, "{info}");
        let model = write_and_verify(&path, d, 900 + i as u64, name);
        // Data clusters are in the data file at the guest offsets, not in the qcow2 file.
        let qcow2_len = std::fs::metadata(&path).unwrap().len();
        assert!(
            qcow2_len < 1 << 20,
            "{name}: the qcow2 file holds only metadata ({qcow2_len} bytes)"
        );
        if raw {
            let bytes = std::fs::read(&data_name).unwrap();
            assert_same(&bytes, &model, "Strata's raw data file");
            // qemu-img reads the data file as the raw image it is.
            run(
                "qemu-img",
                &[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "qcow2",
                    &data_name,
                    path.to_str().unwrap(),
                ],
            );
        }
        // qemu writes after Strata; Strata reads what qemu wrote.
        qemu_io_fill(&path, SIZE, 70 + i as u64, "qcow2");
        assert_qemu_check_clean(&path);
        assert_same(
            &read_all(open(&path, false).as_ref()),
            &qemu_raw(&path, d),
            &format!("{name}: after qemu-io wrote to Strata's image"),
        );
    }
}

fn convert_to_and_from_data_file_images() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let src = qemu_create(d, "src.qcow2", "cluster_size=65536");
    qemu_io_fill(&src, SIZE, 3, "qcow2");
    let want = qemu_raw(&src, d);
    let dst = d.join("dst.qcow2");
    let mut opts = BTreeMap::new();
    let dst_data = d.join("dst.data").display().to_string();
    opts.insert("data_file".to_string(), dst_data.clone());
    let src_img = open(&src, false);
    let new = NewImage {
        path: &dst,
        format: ImageFormat::Qcow2,
        options: &opts,
        compress: false,
        open: OpenOptions::default(),
    };
    convert_to_new_image(
        src_img.as_ref(),
        &new,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert_qemu_check_clean(&dst);
    assert_same(
        &qemu_raw(&dst, d),
        &want,
        "converted into a data file image",
    );
    let back = d.join("back.raw");
    let none = BTreeMap::new();
    let dst_img = open(&dst, false);
    let new = NewImage {
        path: &back,
        format: ImageFormat::Raw,
        options: &none,
        compress: false,
        open: OpenOptions::default(),
    };
    convert_to_new_image(
        dst_img.as_ref(),
        &new,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap();
    // Compressed targets cannot have a data file: refused, and nothing is left behind.
    let c = d.join("c.qcow2");
    opts.insert("data_file".to_string(), "c.data".to_string());
    let new = NewImage {
        path: &c,
        format: ImageFormat::Qcow2,
        options: &opts,
        compress: true,
        open: OpenOptions::default(),
    };
    let e = convert_to_new_image(
        src_img.as_ref(),
        &new,
        &ConvertOptions::default(),
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("external data file"), "{e}");
    assert!(!c.exists() && !d.join("c.data").exists());
    assert_same(
        &std::fs::read(&back).unwrap(),
        &want,
        "converted back to raw",
    );
}

fn refusals_name_the_feature() {
    strata_testkit::require_qemu_utils();
    let dir = tempdir();
    let d = dir.path();
    let a_data = d.join("a.data");
    let path = qemu_create(d, "a.qcow2", &format!("data_file={}", a_data.display()));
    // An appliance image (references refused) must not make the server open its data file.
    let e = format::open_image(
        &path,
        &OpenOptions {
            format: Some(ImageFormat::Qcow2),
            references: References::Refuse,
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .expect_err("an image naming a data file is refused");
    assert!(matches!(e, StorageError::Forbidden(_)), "{e}");
    assert!(e.to_string().contains("data file"), "{e}");
    // A missing data file is named.
    std::fs::remove_file(&a_data).unwrap();
    let e = format::open_image(&path, &OpenOptions::default())
        .expect_err("a missing data file is an error");
    assert!(e.to_string().contains("a.data"), "{e}");
    // Internal snapshots are not allowed with a data file.
    let b = strata_create(d, "b.qcow2", &[("data_file", "b.data")]);
    let img = format::qcow2::open(
        format::open_host_file(&b, &OpenOptions::default()).unwrap(),
        &format::qcow2::Qcow2Options::default(),
    )
    .unwrap();
    let e = img.snapshot_create("s1").unwrap_err();
    assert!(e.to_string().contains("external data file"), "{e}");
    drop(img);
    // An existing data file is not truncated.
    let e = format::create_image(
        &d.join("c.qcow2"),
        ImageFormat::Qcow2,
        SIZE,
        &[("data_file".to_string(), "b.data".to_string())]
            .into_iter()
            .collect(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
    assert!(!d.join("c.qcow2").exists());
}

strata_testkit::main!(
    images_qemu_img_makes_read_and_write,
    images_strata_makes_read_in_qemu,
    convert_to_and_from_data_file_images,
    refusals_name_the_feature,
);
