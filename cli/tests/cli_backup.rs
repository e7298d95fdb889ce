//! End-to-end tests of `strata backup …` through the built binary: round trips with JSON output,
//! clear failures on bad input and damage, and kill -9 in the middle of `create` and `gc`.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("run strata")
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "strata failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn one_line_failure(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected failure; stderr {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{err:?} lacks {needle:?}"
    );
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fastrand::Rng::with_seed(seed).fill(&mut v);
    std::fs::write(path, &v).unwrap();
    v
}

fn list(store: &Path) -> Vec<String> {
    let out = ok(&strata(&[
        "backup",
        "list",
        "--store",
        p(store),
        "--output",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s.get("error").is_none(), "damaged snapshot listed: {s}");
            s["snapshot"].as_str().unwrap().to_string()
        })
        .collect()
}

fn verify_all_clean(store: &Path) {
    let o = strata(&[
        "backup",
        "verify",
        "--all",
        "--store",
        p(store),
        "--output",
        "json",
    ]);
    let out = ok(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["bad-chunks"].as_array().unwrap().is_empty(), "{out}");
}

fn restore_equals(store: &Path, snapshot: &str, target: &Path, want: &[u8]) {
    let _ = std::fs::remove_file(target);
    ok(&strata(&[
        "backup",
        "restore",
        snapshot,
        "--store",
        p(store),
        p(target),
        "-q",
    ]));
    assert!(
        std::fs::read(target).unwrap() == want,
        "{snapshot} restores differently"
    );
}

#[test]
fn create_restore_show_and_json_figures() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let img = d.path().join("disk.img");
    let mut data = random_file(&img, 6 << 20, 1);
    data.extend(vec![0u8; 4 << 20]);
    // The zero tail is a hole, which the source reports without being read.
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    let out = ok(&strata(&[
        "backup",
        "create",
        p(&img),
        "--store",
        p(&store),
        "--id",
        "volume/vg0/vm-100-disk-0",
        "--output",
        "json",
    ]));
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    let snap = m["snapshot"].as_str().unwrap().to_string();
    assert!(snap.starts_with("volume/vg0/vm-100-disk-0/20"), "{snap}");
    for key in [
        "bytes-read",
        "chunks-new",
        "chunks-reused",
        "dedup-ratio",
        "duration-secs",
        "throughput-mib-s",
    ] {
        assert!(!m["stats"][key].is_null(), "missing {key}");
    }
    // Chunk 1 is half data, half hole: read; chunk 2 is all hole: known zero without reading.
    assert_eq!(
        m["stats"]["bytes-read"],
        8 << 20,
        "the zero tail is a hole: not read"
    );
    assert_eq!(m["stats"]["chunks-zero"], 1);

    // Restore by group id (latest), to a new raw image.
    restore_equals(
        &store,
        "volume/vg0/vm-100-disk-0",
        &d.path().join("r.img"),
        &data,
    );
    // Onto an existing image (-n).
    let existing = d.path().join("existing.img");
    random_file(&existing, data.len(), 99);
    ok(&strata(&[
        "backup",
        "restore",
        &snap,
        "--store",
        p(&store),
        p(&existing),
        "-n",
        "-q",
    ]));
    assert!(
        std::fs::read(&existing).unwrap() == data,
        "restore onto an existing image"
    );

    let shown = ok(&strata(&["backup", "show", &snap, "--store", p(&store)]));
    assert!(shown.contains("mode: full"), "{shown}");

    // Bad input: one clear line each.
    one_line_failure(
        &strata(&[
            "backup",
            "restore",
            "volume/x/2026-01-01T00:00:00Z",
            "--store",
            p(&store),
            p(&d.path().join("n.img")),
        ]),
        "no snapshot",
    );
    one_line_failure(
        &strata(&["backup", "list", "--store", p(d.path())]),
        "not a datastore",
    );
    one_line_failure(
        &strata(&[
            "backup",
            "create",
            p(&img),
            "--store",
            p(&store),
            "--id",
            "../evil",
        ]),
        "invalid backup id",
    );
    one_line_failure(
        &strata(&["backup", "prune", "--store", p(&store)]),
        "at least one",
    );
    one_line_failure(
        &strata(&[
            "backup",
            "restore",
            &snap,
            "--store",
            p(&store),
            p(&existing),
        ]),
        "already exists",
    );
}

#[test]
fn incremental_from_dirty_ranges_through_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    ok(&strata(&[
        "backup",
        "init",
        "--store",
        p(&store),
        "--chunk-size",
        "64K",
    ]));
    let img = d.path().join("disk.img");
    let mut data = random_file(&img, 4 << 20, 2);
    let first = ok(&strata(&[
        "backup",
        "create",
        p(&img),
        "--store",
        p(&store),
        "--output",
        "json",
    ]));
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let first_name = first["snapshot"].as_str().unwrap();
    let old = data.clone();
    data[100_000..100_010].copy_from_slice(b"0123456789");
    std::fs::write(&img, &data).unwrap();
    let ranges = d.path().join("dirty");
    std::fs::write(&ranges, format!("base {first_name}\n100000 10\n")).unwrap();
    let second = ok(&strata(&[
        "backup",
        "create",
        p(&img),
        "--store",
        p(&store),
        "--dirty-ranges",
        p(&ranges),
        "--output",
        "json",
    ]));
    let second: serde_json::Value = serde_json::from_str(&second).unwrap();
    assert_eq!(second["change-tracking"]["mode"], "incremental");
    assert_eq!(second["stats"]["bytes-read"], 64 << 10);
    restore_equals(
        &store,
        second["snapshot"].as_str().unwrap(),
        &d.path().join("new.img"),
        &data,
    );
    restore_equals(&store, first_name, &d.path().join("old.img"), &old);
    // A stale ranges file (relative to the first snapshot) falls back to a full read, saying so.
    let o = ok(&strata(&[
        "backup",
        "create",
        p(&img),
        "--store",
        p(&store),
        "--dirty-ranges",
        p(&ranges),
    ]));
    assert!(o.contains("Full read:"), "{o}");
}

#[test]
fn corrupt_chunk_fails_verify_and_restore_clearly() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let img = d.path().join("disk.img");
    random_file(&img, 8 << 20, 3);
    let out = ok(&strata(&[
        "backup",
        "create",
        p(&img),
        "--store",
        p(&store),
        "--output",
        "json",
    ]));
    let snap = serde_json::from_str::<serde_json::Value>(&out).unwrap()["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Damage one stored chunk.
    let chunk = walkdir_first_chunk(&store.join("chunks"));
    let mut bytes = std::fs::read(&chunk).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&chunk, &bytes).unwrap();
    let digest = chunk.file_name().unwrap().to_str().unwrap().to_string();

    let o = strata(&["backup", "verify", "--all", "--store", p(&store)]);
    assert!(!o.status.success());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(&digest) && stdout.contains(&snap),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");

    let target = d.path().join("r.img");
    let o = strata(&["backup", "restore", &snap, "--store", p(&store), p(&target)]);
    one_line_failure(&o, &digest);
    assert!(
        o.stdout.is_empty(),
        "no success message: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!target.exists(), "a failed restore leaves no image behind");
}

fn walkdir_first_chunk(dir: &Path) -> std::path::PathBuf {
    for sub in std::fs::read_dir(dir).unwrap() {
        if let Some(f) = std::fs::read_dir(sub.unwrap().path()).unwrap().next() {
            return f.unwrap().path();
        }
    }
    panic!("no chunk stored");
}

/// Runs `args`, kills it with SIGKILL after `delay`; whether it had finished first.
fn run_and_kill(args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    if let Some(st) = child.try_wait().unwrap() {
        return st.success();
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    false
}

#[test]
fn kill_9_during_create_loses_nothing_and_shows_no_partial_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    ok(&strata(&[
        "backup",
        "init",
        "--store",
        p(&store),
        "--chunk-size",
        "64K",
    ]));
    let small = d.path().join("small.img");
    let small_data = random_file(&small, 2 << 20, 4);
    let first = ok(&strata(&[
        "backup",
        "create",
        p(&small),
        "--store",
        p(&store),
        "--output",
        "json",
    ]));
    let first = serde_json::from_str::<serde_json::Value>(&first).unwrap()["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let big = d.path().join("big.img");
    random_file(&big, 96 << 20, 5);
    let mut finished = 1;
    let mut killed = 0;
    for (i, ms) in [30u64, 120, 400, 900].into_iter().enumerate() {
        let done = run_and_kill(
            &[
                "backup",
                "create",
                p(&big),
                "--store",
                p(&store),
                "--id",
                "image/big",
                "-q",
            ],
            Duration::from_millis(ms),
        );
        if done {
            finished += 1;
        } else {
            killed += 1;
        }
        let names = list(&store);
        assert_eq!(names.len(), finished, "round {i}: {names:?}");
        assert!(names.contains(&first), "a finished snapshot was lost");
        verify_all_clean(&store);
    }
    eprintln!(
        "kill -9 during create: {killed} killed mid-way, {} finished",
        finished - 1
    );
    // Clean up what the killed runs left; everything finished still restores.
    std::thread::sleep(Duration::from_millis(1100));
    ok(&strata(&[
        "backup",
        "gc",
        "--store",
        p(&store),
        "--grace",
        "1",
    ]));
    verify_all_clean(&store);
    restore_equals(&store, &first, &d.path().join("r.img"), &small_data);
    assert_eq!(std::fs::read_dir(store.join("writers")).unwrap().count(), 0);
    // And a new backup of the big image works.
    ok(&strata(&[
        "backup",
        "create",
        p(&big),
        "--store",
        p(&store),
        "--id",
        "image/big",
        "-q",
    ]));
    verify_all_clean(&store);
}

#[test]
fn kill_9_during_gc_keeps_every_referenced_chunk() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    ok(&strata(&[
        "backup",
        "init",
        "--store",
        p(&store),
        "--chunk-size",
        "64K",
    ]));
    let keep = d.path().join("keep.img");
    let keep_data = random_file(&keep, 4 << 20, 6);
    let kept = ok(&strata(&[
        "backup",
        "create",
        p(&keep),
        "--store",
        p(&store),
        "--output",
        "json",
    ]));
    let kept = serde_json::from_str::<serde_json::Value>(&kept).unwrap()["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let churn = d.path().join("churn.img");
    let mut last = Vec::new();
    for (round, ms) in [20u64, 50, 120].into_iter().enumerate() {
        for k in 0..3 {
            last = random_file(&churn, 12 << 20, 100 + round as u64 * 10 + k);
            ok(&strata(&[
                "backup",
                "create",
                p(&churn),
                "--store",
                p(&store),
                "-q",
            ]));
        }
        ok(&strata(&[
            "backup",
            "prune",
            "--store",
            p(&store),
            "--id",
            "image/churn.img",
            "--keep-last",
            "1",
        ]));
        std::thread::sleep(Duration::from_millis(1100));
        let before = count_chunks(&store);
        run_and_kill(
            &["backup", "gc", "--store", p(&store), "--grace", "1"],
            Duration::from_millis(ms),
        );
        eprintln!(
            "kill -9 during gc after {ms} ms: chunk files {before} -> {}",
            count_chunks(&store)
        );
        let names = list(&store);
        assert_eq!(names.len(), 2, "{names:?}");
        verify_all_clean(&store);
        restore_equals(&store, "image/churn.img", &d.path().join("c.img"), &last);
    }
    ok(&strata(&[
        "backup",
        "gc",
        "--store",
        p(&store),
        "--grace",
        "1",
    ]));
    verify_all_clean(&store);
    restore_equals(&store, &kept, &d.path().join("k.img"), &keep_data);
    // Only the chunks of the two remaining snapshots are left.
    assert_eq!(
        count_chunks(&store),
        (4 << 20) / (64 << 10) + (12 << 20) / (64 << 10)
    );
}

fn count_chunks(store: &Path) -> usize {
    std::fs::read_dir(store.join("chunks"))
        .unwrap()
        .map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count())
        .sum()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(o)).unwrap()
}

/// A thin volume: restore onto it, back it up (the first backup adds the dirty bitmap), write to
/// it through strata, back it up again incrementally (only dirty chunks read), and check both
/// snapshots restore what the volume held.
#[test]
fn thin_volume_round_trip_and_incremental_from_its_dirty_bitmap() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let dv = p(&data);
    ok(&strata(&["--data", dv, "init", "--pv-size", "256M"]));
    ok(&strata(&[
        "--data",
        dv,
        "lv",
        "create",
        "--thin",
        "strata/data",
        "--size",
        "8M",
        "strata/disk",
    ]));
    let store = d.path().join("store");
    ok(&strata(&[
        "backup",
        "init",
        "--store",
        p(&store),
        "--chunk-size",
        "64K",
    ]));
    let img = d.path().join("a.raw");
    let a = random_file(&img, 8 << 20, 7);
    ok(&strata(&[
        "backup",
        "create",
        p(&img),
        "--store",
        p(&store),
        "--id",
        "image/a",
        "-q",
    ]));
    ok(&strata(&[
        "--data",
        dv,
        "backup",
        "restore",
        "image/a",
        "--store",
        p(&store),
        "lv:strata/disk",
        "-q",
    ]));

    let first = json(&strata(&[
        "--data",
        dv,
        "backup",
        "create",
        "lv:strata/disk",
        "--store",
        p(&store),
        "--output",
        "json",
    ]));
    assert_eq!(first["change-tracking"]["mode"], "full");
    assert_eq!(first["source-format"], "volume");
    let first_name = first["snapshot"].as_str().unwrap().to_string();
    assert!(
        first_name.starts_with("volume/strata/disk/"),
        "{first_name}"
    );
    restore_equals(&store, &first_name, &d.path().join("v1.raw"), &a);

    ok(&strata(&[
        "--data",
        dv,
        "image",
        "bench",
        "-w",
        "-c",
        "20",
        "-s",
        "4k",
        "--pattern",
        "rand",
        "lv:strata/disk",
    ]));
    let second = json(&strata(&[
        "--data",
        dv,
        "backup",
        "create",
        "lv:strata/disk",
        "--store",
        p(&store),
        "--output",
        "json",
    ]));
    assert_eq!(second["change-tracking"]["mode"], "incremental", "{second}");
    let dirty = second["change-tracking"]["dirty-chunks"].as_u64().unwrap();
    assert!(
        (1..=20).contains(&dirty),
        "{dirty} dirty chunks for 20 writes"
    );
    assert_eq!(
        second["stats"]["bytes-read"].as_u64().unwrap(),
        dirty * (64 << 10)
    );

    // The volume's current contents, read in full under another group, equal the incremental.
    let full = json(&strata(&[
        "--data",
        dv,
        "backup",
        "create",
        "lv:strata/disk",
        "--store",
        p(&store),
        "--id",
        "volume/check",
        "--output",
        "json",
    ]));
    assert_eq!(full["change-tracking"]["mode"], "full");
    let now = d.path().join("now.raw");
    ok(&strata(&[
        "backup",
        "restore",
        "volume/check",
        "--store",
        p(&store),
        p(&now),
        "-q",
    ]));
    let current = std::fs::read(&now).unwrap();
    assert!(current != a, "the writes changed the volume");
    restore_equals(
        &store,
        second["snapshot"].as_str().unwrap(),
        &d.path().join("v2.raw"),
        &current,
    );
    restore_equals(&store, &first_name, &d.path().join("v1b.raw"), &a);
    verify_all_clean(&store);
}
