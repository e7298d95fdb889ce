//! End-to-end tests of `strata pv|vg|lv`: the built binary on PV files in a temporary data
//! directory. Errors must be one line on stderr with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--data").arg(self.data()).args(args);
        c.env_remove("STRATA_DATA");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "strata {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(!o.status.success(), "strata {args:?} succeeded");
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(
            err.lines().count(),
            1,
            "strata {args:?}: not one line: {err}"
        );
        assert!(err.starts_with("strata: "), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }
}

fn lv<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed in {list}"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
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
    e.ok(&["lv", "bitmap", "clear", "vg0/thin", "daily"]);
    e.ok(&["lv", "bitmap", "remove", "vg0/thin", "daily"]);

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

#[test]
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

#[test]
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

#[test]
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
