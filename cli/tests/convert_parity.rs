//! qemu-img parity of `strata image convert` (issue 23): `-o subformat=streamOptimized` without
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

/// Runs qemu-img (or qemu-io); `None` when it is not installed (a failure under CI).
fn qemu(tool: &str, args: &[&str]) -> Option<String> {
    match Command::new(tool).args(args).output() {
        Ok(o) => {
            assert!(
                o.status.success(),
                "{tool} {args:?}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            Some(String::from_utf8_lossy(&o.stdout).into_owned())
        }
        Err(_) => {
            assert!(std::env::var_os("CI").is_none(), "{tool} is not installed");
            eprintln!("\n*** SKIPPED: {tool} not installed (apt-get install qemu-utils) ***\n");
            None
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn stream_optimized_without_c_and_unsafe_cache() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "16M"]).is_none() {
        return;
    }
    qemu("qemu-io", &["-c", "write -P 0x3c 1M 2M", s(&src)]).unwrap();
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
    let info = qemu("qemu-img", &["info", "--output=json", s(&out)]).unwrap();
    assert!(info.contains("streamOptimized"), "{info}");
    qemu("qemu-img", &["compare", s(&src), s(&out)]).unwrap();
    let help =
        String::from_utf8_lossy(&strata(&["image", "convert", "--help"]).stdout).into_owned();
    assert!(
        help.contains("unsafe") && help.contains("Strata's default flushes"),
        "{help}"
    );
}

#[test]
fn snapshot_selectors_read_without_applying() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("snap.qcow2");
    if qemu("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "8M"]).is_none() {
        return;
    }
    qemu("qemu-io", &["-c", "write -P 1 0 1M", s(&src)]).unwrap();
    qemu("qemu-img", &["snapshot", "-c", "first", s(&src)]).unwrap();
    qemu("qemu-io", &["-c", "write -P 2 0 2M", s(&src)]).unwrap();
    qemu("qemu-img", &["snapshot", "-c", "second", s(&src)]).unwrap();
    qemu("qemu-io", &["-c", "write -P 3 512k 512k", s(&src)]).unwrap();
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
        )
        .unwrap();
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
    )
    .unwrap();
    qemu("qemu-img", &["check", s(&src)]).unwrap();
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

#[test]
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
