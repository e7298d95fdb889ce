//! Malformed vmdks get a clear error and never a panic: a grain directory beyond the end of
//! the file, a zero grain size, an absurd capacity, a garbage descriptor, extent and parent
//! paths that leave the image's folder, an incomplete stream.

use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_storage::format::{self, open_image, ImageFormat, OpenOptions};

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    }
}

fn sparse(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    format::create_image(&p, ImageFormat::Vmdk, 64 << 20, &Default::default()).unwrap();
    p
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_err(p: &Path) -> String {
    let e = open_image(p, &ro())
        .err()
        .unwrap_or_else(|| panic!("{} opened", p.display()));
    e.to_string()
}

#[test]
fn bad_sparse_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, u64, Vec<u8>, &str); 5] = [
        (
            "gd.vmdk",
            56,
            (1u64 << 40).to_le_bytes().to_vec(),
            "grain directory",
        ),
        (
            "grain.vmdk",
            20,
            0u64.to_le_bytes().to_vec(),
            "grain size is zero",
        ),
        (
            "cap.vmdk",
            12,
            (u64::MAX / 3).to_le_bytes().to_vec(),
            "64 TiB",
        ),
        (
            "gtes.vmdk",
            44,
            100_000u32.to_le_bytes().to_vec(),
            "entries per grain table",
        ),
        ("ver.vmdk", 4, 9u32.to_le_bytes().to_vec(), "version 9"),
    ];
    for (name, at, bytes, want) in cases {
        let p = sparse(dir.path(), name);
        patch(&p, at, &bytes);
        let e = open_err(&p);
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn grain_tables_pointing_outside_the_file_fail_reads_not_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = sparse(dir.path(), "gt.vmdk");
    // The first grain directory entry (at gdOffset) points far beyond the end.
    let f = std::fs::File::open(&p).unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    let gd = u64::from_le_bytes(h[56..64].try_into().unwrap());
    patch(&p, gd * 512, &0x7fff_fff0u32.to_le_bytes());
    let img = open_image(&p, &ro()).unwrap();
    let mut q = strata_storage::io::blocking::BlockingQueue::open(img.as_ref(), 4).unwrap();
    let e = q.read_at(0, 4096).unwrap_err().to_string();
    assert!(e.contains("beyond the end"), "{e}");
}

#[test]
fn garbage_descriptors_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (i, text) in [
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n",
        "# Disk DescriptorFile\n\u{1}\u{2}garbage here\n",
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"missing-flat.vmdk\" 0\n",
        "# Disk DescriptorFile\nversion=1\ncreateType=\"vmfsSparse\"\nRW 100 VMFSSPARSE \"x\"\n",
    ]
    .iter()
    .enumerate()
    {
        let p = dir.path().join(format!("g{i}.vmdk"));
        std::fs::write(&p, text).unwrap();
        let e = open_err(&p);
        assert!(!e.is_empty());
    }
}

#[test]
fn extent_and_parent_paths_may_not_leave_the_folder() {
    let root = tempfile::tempdir().unwrap();
    let inner = root.path().join("images");
    std::fs::create_dir(&inner).unwrap();
    std::fs::write(root.path().join("secret-flat.vmdk"), vec![7u8; 1 << 20]).unwrap();
    let p = inner.join("evil.vmdk");
    std::fs::write(&p, "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"../secret-flat.vmdk\" 0\n").unwrap();
    let e = open_err(&p);
    assert!(e.contains("leaves the image's folder"), "{e}");
    let q = inner.join("abs.vmdk");
    std::fs::write(&q, "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/hostname\" 0\n").unwrap();
    assert!(open_err(&q).contains("leaves the image's folder"));
    // A delta disk whose parent is outside the folder.
    let child = sparse(&inner, "child.vmdk");
    let f = std::fs::File::open(&child).unwrap();
    let mut desc = vec![0u8; 1024];
    f.read_exact_at(&mut desc, 512).unwrap();
    let text = String::from_utf8_lossy(&desc)
        .trim_end_matches('\0')
        .to_string();
    let text = text.replace(
        "parentCID=ffffffff",
        "parentCID=00000001\nparentFileNameHint=\"../base.vmdk\"",
    );
    patch(&child, 512, text.as_bytes());
    let e = open_err(&child);
    assert!(e.contains("parent path") && e.contains("leaves"), "{e}");
}

#[test]
fn incomplete_streams_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.vmdk");
    {
        let mut w =
            format::create_compressed(&p, ImageFormat::Vmdk, 1 << 20, &Default::default()).unwrap();
        w.write_unit(0, &vec![5u8; 65536]).unwrap();
        // Dropped without finish.
    }
    let e = open_err(&p);
    assert!(e.contains("incomplete"), "{e}");
    let e = format::create_compressed(
        &dir.path().join("t.vmdk"),
        ImageFormat::Vmdk,
        1 << 20,
        &format::parse_options("subformat=monolithicFlat").unwrap(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("streamOptimized"), "{e}");
}

#[test]
fn creation_refuses_existing_files_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.vmdk");
    std::fs::write(dir.path().join("d-s002.vmdk"), b"in the way").unwrap();
    let opts = format::parse_options("subformat=twoGbMaxExtentSparse").unwrap();
    let e = format::create_image(&p, ImageFormat::Vmdk, 3 << 30, &opts).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert!(
        !dir.path().join("d-s001.vmdk").exists(),
        "a partial image was left behind"
    );
    assert!(!p.exists());
}
