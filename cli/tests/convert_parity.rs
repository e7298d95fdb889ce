//! qemu-img parity of `strata image convert`: `-o subformat=streamOptimized` without
//! `-c`, `-t unsafe` accepted, `-l snapshot.name=`/`snapshot.id=` reading an internal snapshot
//! without applying it, and errors that name the target rather than the hidden staging path.

use std::path::Path;
use std::process::{Command, Output};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env_remove("STRATA_DATA")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) {
    let o = strata(args);
    assert!(
        o.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs qemu-img (or qemu-io), which must succeed; returns its stdout.
fn qemu(tool: &str, args: &[&str]) -> String {
    let o = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}"));
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stream_optimized_without_c_and_unsafe_cache() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    strata_testkit::require_qemu_utils();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "16M"]);
    qemu("qemu-io", &["-c", "write -P 0x3c 1M 2M", s(&src)]);
    let out = dir.path().join("out.vmdk");
    ok(&[
        "image",
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "-t",
        "unsafe",
        s(&src),
        s(&out),
    ]);
    let info = qemu("qemu-img", &["info", "--output=json", s(&out)]);
    assert!(info.contains("streamOptimized"), "{info}");
    qemu("qemu-img", &["compare", s(&src), s(&out)]);
    let help =
        String::from_utf8_lossy(&strata(&["image", "convert", "--help"]).stdout).into_owned();
    assert!(
        help.contains("unsafe") && help.contains("Strata's default flushes"),
        "{help}"
    );
}

fn snapshot_selectors_read_without_applying() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("snap.qcow2");
    strata_testkit::require_qemu_utils();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "8M"]);
    qemu("qemu-io", &["-c", "write -P 1 0 1M", s(&src)]);
    qemu("qemu-img", &["snapshot", "-c", "first", s(&src)]);
    qemu("qemu-io", &["-c", "write -P 2 0 2M", s(&src)]);
    qemu("qemu-img", &["snapshot", "-c", "second", s(&src)]);
    qemu("qemu-io", &["-c", "write -P 3 512k 512k", s(&src)]);
    for (sel, name) in [
        ("snapshot.name=first", "first"),
        ("snapshot.id=2", "second"),
    ] {
        let ours = dir.path().join(format!("ours-{name}.raw"));
        let theirs = dir.path().join(format!("theirs-{name}.raw"));
        ok(&[
            "image",
            "convert",
            "-O",
            "raw",
            "-l",
            sel,
            s(&src),
            s(&ours),
        ]);
        qemu(
            "qemu-img",
            &["convert", "-O", "raw", "-l", sel, s(&src), s(&theirs)],
        );
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{sel}"
        );
    }
    // The active state is untouched and the image is clean.
    qemu(
        "qemu-io",
        &[
            "-c",
            "read -P 3 512k 512k",
            "-c",
            "read -P 2 1M 1M",
            s(&src),
        ],
    );
    qemu("qemu-img", &["check", s(&src)]);
    let o = strata(&[
        "image",
        "convert",
        "-O",
        "raw",
        "-l",
        "snapshot.name=nope",
        s(&src),
        s(&dir.path().join("x.raw")),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no snapshot named 'nope'"));
}

fn errors_never_name_the_staging_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let target = dir.path().join("t.vmdk");
    for opts in [
        "subformat=monolithicFlat,bogus=1",
        "subformat=twoGbMaxExtentSparse,adapter_type=nonsense",
    ] {
        let o = strata(&[
            "image",
            "convert",
            "-O",
            "vmdk",
            "-o",
            opts,
            s(&src),
            s(&target),
        ]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!err.contains(".convert-"), "{err}");
        assert!(err.contains("t.vmdk"), "{err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

strata_testkit::main!(
    stream_optimized_without_c_and_unsafe_cache,
    snapshot_selectors_read_without_applying,
    errors_never_name_the_staging_path,
);
