//! End-to-end tests of `strata pv|vg|lv`: the built binary on PV files in a temporary data
//! directory. Errors must be one line on stderr with a non-zero exit.

use std::path::Path;
use std::process::Command;

mod common;
use common::{lv, CliEnv as Env};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn the_whole_volume_workflow() {
    let e = Env::new();
    let (pv1, pv2) = (e.path("pv1.img"), e.path("pv2.img"));
    let created = e.json(&["pv", "create", s(&pv1), "--size", "256M"]);
    assert_eq!(created["size"], 256 << 20);
    e.ok(&["pv", "create", s(&pv2), "--size", "128M"]);
    assert_eq!(e.json(&["pv", "list"]).as_array().unwrap().len(), 2);
    let vg = e.json(&["vg", "create", "vg0", s(&pv1)]);
    assert_eq!(vg["name"], "vg0");
    e.ok(&["vg", "extend", "vg0", s(&pv2)]);
    let vgs = e.json(&["vg", "list"]);
    assert_eq!(vgs[0]["pv-count"], 2);

    e.ok(&[
        "lv",
        "create-pool",
        "vg0/pool",
        "--size",
        "128M",
        "--block-size",
        "64K",
    ]);
    e.ok(&[
        "lv", "create", "vg0/thin", "--size", "1G", "--thin", "vg0/pool",
    ]);
    e.ok(&["lv", "create", "vg0/lin", "--size", "20M"]);
    // Write through the volume by name.
    e.ok(&[
        "image",
        "bench",
        "-w",
        "-c",
        "64",
        "-s",
        "64K",
        "lv:vg0/thin",
    ]);
    let list = e.json(&["lv", "list", "vg0"]);
    assert_eq!(lv(&list, "thin")["mapped-bytes"], 64 * 65536);
    assert_eq!(lv(&list, "lin")["size"], 20 << 20);
    let pool = &lv(&list, "pool")["usage"];
    assert!(pool["overcommit"].as_f64().unwrap() > 7.9, "{pool}");

    e.ok(&["lv", "snapshot", "vg0/thin", "vg0/snap"]);
    let err = e.fails(&["lv", "clone", "vg0/thin", "vg0/c0"]);
    assert!(err.contains("template"), "{err}");
    e.ok(&["lv", "clone", "vg0/snap", "vg0/c1"]);
    e.ok(&["lv", "template", "vg0/c1"]);
    e.ok(&["lv", "clone", "vg0/c1", "vg0/c2"]);
    let list = e.json(&["lv", "list"]);
    assert_eq!(lv(&list, "snap")["type"], "snapshot");
    assert_eq!(lv(&list, "c2")["origin"], "c1");
    assert_eq!(lv(&list, "c1")["template"], true);
    assert_eq!(
        lv(&list, "c2")["mapped-bytes"],
        64 * 65536,
        "a clone shares its source's blocks"
    );

    e.ok(&["lv", "resize", "vg0/thin", "--size", "+1G"]);
    e.ok(&["lv", "resize", "vg0/lin", "--size", "40M"]);
    e.ok(&["lv", "rename", "vg0/lin", "lin2"]);
    let list = e.json(&["lv", "list", "vg0"]);
    assert_eq!(lv(&list, "thin")["size"], 2u64 << 30);
    assert_eq!(lv(&list, "lin2")["size"], 40 << 20);

    // Bitmaps.
    e.ok(&["lv", "bitmap", "add", "vg0/thin", "daily"]);
    e.ok(&[
        "image",
        "bench",
        "-w",
        "-c",
        "4",
        "-s",
        "4K",
        "-o",
        "1M",
        "lv:vg0/thin",
    ]);
    let bm = e.json(&["lv", "bitmap", "show", "vg0/thin", "daily"]);
    assert_eq!(bm["valid"], true);
    assert_eq!(bm["ranges"][0]["offset"], 1 << 20);
    assert_eq!(bm["ranges"][0]["length"], 65536);
    assert_eq!(
        e.json(&["lv", "bitmap", "list", "vg0/thin"])[0]["dirty-bytes"],
        65536
    );
    // Merge into a finer bitmap added later: it gets the coarse bitmap's bits.
    e.ok(&[
        "lv",
        "bitmap",
        "add",
        "--granularity",
        "4K",
        "vg0/thin",
        "weekly",
    ]);
    e.ok(&["lv", "bitmap", "merge", "vg0/thin", "daily", "weekly"]);
    let weekly = e.json(&["lv", "bitmap", "show", "vg0/thin", "weekly"]);
    assert_eq!(weekly["ranges"], bm["ranges"], "{weekly}");
    e.ok(&["lv", "bitmap", "clear", "vg0/thin", "daily"]);
    let daily = e.json(&["lv", "bitmap", "show", "vg0/thin", "daily"]);
    assert_eq!(daily["ranges"].as_array().unwrap().len(), 0, "{daily}");
    e.ok(&["lv", "bitmap", "remove", "vg0/thin", "daily"]);
    let left = e.json(&["lv", "bitmap", "list", "vg0/thin"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["granularity"], 4096, "{left}");

    let check = e.json(&["vg", "check", "vg0"]);
    assert_eq!(check["errors"].as_array().unwrap().len(), 0, "{check}");
    assert_eq!(check["pools"][0]["error-count"], 0, "{check}");

    // Tear down.
    let err = e.fails(&["lv", "remove", "vg0/pool"]);
    assert!(err.contains("remove them first"), "{err}");
    for n in ["c2", "c1", "snap", "thin", "pool", "lin2"] {
        e.ok(&["lv", "remove", &format!("vg0/{n}")]);
    }
    e.ok(&["vg", "reduce", "vg0", s(&pv2)]);
    e.ok(&["vg", "remove", "vg0"]);
    e.ok(&["pv", "remove", s(&pv2)]);
    assert_eq!(e.json(&["vg", "list"]).as_array().unwrap().len(), 0);
}

fn bad_input_gets_one_clear_line() {
    let e = Env::new();
    let pv = e.path("pv.img");
    e.ok(&["pv", "create", s(&pv), "--size", "64M"]);
    e.ok(&["vg", "create", "vg0", s(&pv)]);
    let cases: [(&[&str], &str); 9] = [
        (&["vg", "create", "vg0", s(&pv)], "already exists"),
        (&["vg", "show", "nope"], "volume group nope does not exist"),
        (
            &["lv", "create", "vg0/a/b", "--size", "1M"],
            "must not contain '/'",
        ),
        (&["lv", "create", "vg0/..", "--size", "1M"], "reserved"),
        (
            &["lv", "create", "vg0/x\u{1}", "--size", "1M"],
            "control character",
        ),
        (
            &[
                "lv",
                "create",
                &format!("vg0/{}", "n".repeat(150)),
                "--size",
                "1M",
            ],
            "limit",
        ),
        (&["lv", "create", "vg0/big", "--size", "1T"], "free extents"),
        (
            &[
                "lv",
                "create",
                "vg0/t",
                "--size",
                "1G",
                "--thin",
                "vg0/nopool",
            ],
            "does not exist",
        ),
        (&["pv", "create", s(&pv)], "already exists"),
    ];
    for (args, want) in cases {
        let err = e.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Damage both label copies: the group's PV is missing, and nothing is written.
    let mut bytes = std::fs::read(&pv).unwrap();
    bytes[20] ^= 0xff;
    bytes[4096 + 20] ^= 0xff;
    std::fs::write(&pv, &bytes).unwrap();
    let err = e.fails(&["lv", "list", "vg0"]);
    assert!(
        err.contains("both copies are damaged") || err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(std::fs::read(&pv).unwrap(), bytes);
}

fn a_group_in_use_by_another_process_is_refused() {
    let e = Env::new();
    let pv = e.path("pv.img");
    e.ok(&["pv", "create", s(&pv), "--size", "128M"]);
    e.ok(&["vg", "create", "vg0", s(&pv)]);
    e.ok(&["lv", "create-pool", "vg0/pool", "--size", "64M"]);
    e.ok(&[
        "lv", "create", "vg0/t", "--size", "32M", "--thin", "vg0/pool",
    ]);
    let mut holder = e
        .cmd(&["image", "bench", "--time", "3", "-s", "4K", "lv:vg0/t"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let err = e.fails(&["lv", "create", "vg0/x", "--size", "1M"]);
    assert!(err.contains("vg0") && err.contains("busy"), "{err}");
    assert!(holder.wait().unwrap().success());
    e.ok(&[
        "lv", "create", "vg0/x", "--size", "1M", "--thin", "vg0/pool",
    ]);
}

fn the_data_directory_comes_from_the_environment_too() {
    let e = Env::new();
    let pv = e.path("pv.img");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["pv", "create", s(&pv), "--size", "16M"])
        .env("STRATA_DATA", e.data())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(e.data().join("devices.json").exists());
    assert_eq!(e.json(&["pv", "list"]).as_array().unwrap().len(), 1);
}

/// A 24 MiB raw file with data at the start, in the middle and at the end, holes between.
fn pattern_file(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; 24 << 20];
    for (at, len, seed) in [
        (0usize, 1 << 20, 7u32),
        (9 << 20, 65536, 11),
        ((24 << 20) - 4096, 4096, 13),
    ] {
        for (i, b) in bytes[at..at + len].iter_mut().enumerate() {
            *b = ((i as u32).wrapping_mul(seed) >> 3) as u8 | 1;
        }
    }
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn convert_reads_and_writes_volumes_and_qemu_img_agrees() {
    let e = Env::new();
    let pv = e.path("pv.img");
    e.ok(&["pv", "create", s(&pv), "--size", "256M"]);
    e.ok(&["vg", "create", "vg0", s(&pv)]);
    e.ok(&["lv", "create-pool", "vg0/pool", "--size", "64M"]);
    e.ok(&[
        "lv", "create", "vg0/disk", "--size", "24M", "--thin", "vg0/pool",
    ]);
    e.ok(&["lv", "create", "vg0/lin", "--size", "24M"]);
    e.ok(&["lv", "create", "vg0/small", "--size", "8M"]);
    let src = e.path("src.raw");
    let bytes = pattern_file(&src);

    // Import into a thin volume, export it as qcow2: qemu-img checks and compares.
    e.ok(&[
        "image",
        "convert",
        "-n",
        "-O",
        "raw",
        s(&src),
        "lv:vg0/disk",
    ]);
    let qcow2 = e.path("out.qcow2");
    e.ok(&["image", "convert", "-O", "qcow2", "lv:vg0/disk", s(&qcow2)]);
    qemu_img(&["check", s(&qcow2)]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&qcow2)]);
    let list = e.json(&["lv", "list", "vg0"]);
    assert_eq!(
        lv(&list, "disk")["mapped-bytes"],
        (1 << 20) + 2 * 65536,
        "the holes stay unprovisioned"
    );

    // Volume to volume in one group, onto a volume holding other data: zeros are written too.
    e.ok(&[
        "image",
        "bench",
        "-w",
        "-c",
        "384",
        "-s",
        "64K",
        "lv:vg0/lin",
    ]);
    e.ok(&[
        "image",
        "convert",
        "-n",
        "-O",
        "raw",
        "lv:vg0/disk",
        "lv:vg0/lin",
    ]);
    let back = e.path("back.raw");
    e.ok(&["image", "convert", "-O", "raw", "lv:vg0/lin", s(&back)]);
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "lin differs from the source"
    );

    // An image back into a volume from qcow2 made by qemu-img.
    let made = e.path("made.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&made)]);
    e.ok(&[
        "lv",
        "create",
        "vg0/disk2",
        "--size",
        "24M",
        "--thin",
        "vg0/pool",
    ]);
    e.ok(&[
        "image",
        "convert",
        "-n",
        "-O",
        "raw",
        s(&made),
        "lv:vg0/disk2",
    ]);
    let back2 = e.path("back2.raw");
    e.ok(&["image", "convert", "-O", "raw", "lv:vg0/disk2", s(&back2)]);
    qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&back2)]);

    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "image",
                "convert",
                "-n",
                "-O",
                "raw",
                "lv:vg0/disk",
                "lv:vg0/disk",
            ],
            "the same",
        ),
        (
            &[
                "image",
                "convert",
                "-n",
                "-O",
                "qcow2",
                s(&src),
                "lv:vg0/lin",
            ],
            "does not apply to a volume",
        ),
        (
            &["image", "convert", "-c", "-O", "raw", s(&src), "lv:vg0/lin"],
            "with -n",
        ),
        (
            &[
                "image",
                "convert",
                "-n",
                "-O",
                "raw",
                s(&src),
                "lv:vg0/small",
            ],
            "small",
        ),
        (
            &[
                "image",
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                "lv:vg0/disk",
                s(&back),
            ],
            "-f",
        ),
    ];
    for (args, want) in cases {
        let err = e.fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let check = e.json(&["vg", "check", "vg0"]);
    assert_eq!(check["errors"].as_array().unwrap().len(), 0, "{check}");
}

/// Dirty bitmaps of an image file and of a volume: writes through strata mark them, a second
/// process is refused while one holds the image or group, and a writer killed with SIGKILL
/// leaves them invalid (a later backup must read everything).
fn image_and_volume_bitmaps_track_writes_and_are_invalid_after_a_kill() {
    let e = Env::new();
    let img = e.path("disk.qcow2");
    e.ok(&["image", "create", "-q", "-f", "qcow2", s(&img), "64M"]);
    let pv = e.path("pv.img");
    e.ok(&["pv", "create", s(&pv), "--size", "128M"]);
    e.ok(&["vg", "create", "vg0", s(&pv)]);
    e.ok(&["lv", "create-pool", "vg0/pool", "--size", "64M"]);
    e.ok(&[
        "lv", "create", "vg0/t", "--size", "64M", "--thin", "vg0/pool",
    ]);
    let lv_target = "lv:vg0/t".to_string();
    for (kind, bitmap_target, io_target) in [
        ("image", s(&img).to_string(), s(&img).to_string()),
        ("lv", "vg0/t".to_string(), lv_target),
    ] {
        let bm = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec![kind.into(), "bitmap".into()];
            v.extend(args.iter().map(|a| a.to_string()));
            v
        };
        let run = |args: Vec<String>| {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            e.json(&a)
        };
        let t = bitmap_target.as_str();
        run(bm(&["add", "--granularity", "4K", t, "daily"]));
        e.ok(&[
            "image", "bench", "-w", "-c", "4", "-s", "4K", "-o", "1M", &io_target,
        ]);
        let shown = run(bm(&["show", t, "daily"]));
        assert_eq!(shown["valid"], true, "{kind}: {shown}");
        assert_eq!(shown["ranges"][0]["offset"], 1 << 20, "{kind}: {shown}");
        assert_eq!(shown["ranges"][0]["length"], 4 * 4096, "{kind}: {shown}");
        run(bm(&["add", t, "all"]));
        run(bm(&["merge", t, "daily", "all"]));
        let all = run(bm(&["show", t, "all"]));
        assert_eq!(
            all["ranges"][0]["length"], 65536,
            "{kind}: 64K granularity: {all}"
        );
        run(bm(&["clear", t, "daily"]));
        run(bm(&["remove", t, "all"]));
        let bad = bm(&["show", t, "nope"]);
        let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
        assert!(e.fails(&bad).contains("nope"));
        let bad = bm(&["add", "--granularity", "3K", t, "x"]);
        let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
        e.fails(&bad);

        // A writer holds the image (or group): bitmap commands are refused, not interleaved.
        let mut writer = e
            .cmd(&[
                "image", "bench", "-w", "--time", "20", "-s", "4K", "-o", "8M", &io_target,
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let busy = bm(&["list", t]);
        let busy: Vec<&str> = busy.iter().map(String::as_str).collect();
        let err = e.fails(&busy);
        assert!(err.contains("busy"), "{kind}: {err}");
        // An unclean stop: the bitmap can no longer be trusted.
        writer.kill().unwrap();
        writer.wait().unwrap();
        let list = run(bm(&["list", t]));
        assert_eq!(list[0]["name"], "daily", "{kind}: {list}");
        assert_eq!(list[0]["valid"], false, "{kind}: {list}");
        // Clearing makes it valid again from now on.
        run(bm(&["clear", t, "daily"]));
        assert_eq!(run(bm(&["list", t]))[0]["valid"], true, "{kind}");
    }
    let o = Command::new("qemu-img")
        .args(["check", s(&img)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Attaches `file` to a free loop device; `None` where loop devices are not available (not
/// root, or a container without them).
fn attach_loop(file: &Path) -> Option<String> {
    let o = Command::new("losetup")
        .args(["-f", "--show", s(file)])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A block device as a PV: the same commands as on a file, and the data read back whole.
fn a_block_device_is_a_pv() {
    let e = Env::new();
    let backing = e.path("loop.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    let Some(dev) = attach_loop(&backing) else {
        strata_testkit::missing("a loop device (losetup -f needs root and /dev/loop-control)");
    };
    let _detach = Loop(dev.clone());
    let pv = e.json(&["pv", "create", &dev]);
    assert_eq!(pv["size"], 96 << 20, "{pv}");
    e.ok(&["vg", "create", "vgb", &dev]);
    e.ok(&["lv", "create-pool", "vgb/pool", "--size", "48M"]);
    e.ok(&[
        "lv", "create", "vgb/t", "--size", "1G", "--thin", "vgb/pool",
    ]);
    e.ok(&["lv", "create", "vgb/lin", "--size", "24M"]);
    let src = e.path("src.raw");
    let bytes = pattern_file(&src);
    for lv in ["lv:vgb/t", "lv:vgb/lin"] {
        e.ok(&["image", "convert", "-n", "-O", "raw", s(&src), lv]);
        let back = e.path("back.raw");
        let _ = std::fs::remove_file(&back);
        e.ok(&["image", "convert", "-O", "raw", lv, s(&back)]);
        let got = std::fs::read(&back).unwrap();
        assert!(got[..bytes.len()] == bytes[..], "{lv} differs");
    }
    let check = e.json(&["vg", "check", "vgb"]);
    assert_eq!(check["errors"].as_array().unwrap().len(), 0, "{check}");
    let err = e.fails(&["pv", "remove", &dev]);
    assert!(err.contains("vgb"), "{err}");
}

strata_testkit::main!(
    the_whole_volume_workflow,
    bad_input_gets_one_clear_line,
    a_group_in_use_by_another_process_is_refused,
    the_data_directory_comes_from_the_environment_too,
    convert_reads_and_writes_volumes_and_qemu_img_agrees,
    image_and_volume_bitmaps_track_writes_and_are_invalid_after_a_kill,
    a_block_device_is_a_pv,
);
