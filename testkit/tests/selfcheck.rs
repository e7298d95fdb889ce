//! The harness checked from outside: this binary runs itself as a child with a few inner tests
//! (one passes, one needs a tool no machine has, one is not applicable, one fails) with and
//! without `CI`, and reads the child's libtest output. It also checks that no test binary built
//! with `harness = false` still carries `#[test]` functions, which such a binary would silently
//! drop.

use std::path::{Path, PathBuf};
use std::process::Command;

const INNER: &str = "STRATA_TESTKIT_SELFCHECK_INNER";

fn inner_passes() {}

fn inner_needs_a_missing_tool() {
    strata_testkit::require_tool("strata-testkit-no-such-tool", "no-such-package");
    panic!("require_tool returned although the tool is missing");
}

fn inner_not_applicable() -> Result<(), String> {
    strata_testkit::not_applicable("this host is not the kind the test needs");
}

fn inner_fails() -> Result<(), String> {
    Err("a real failure".into())
}

fn inner_partial() {
    strata_testkit::partial_skip("one optional part");
}

/// Runs this binary as the inner suite; returns (success, stdout).
fn inner(ci: bool) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.env(INNER, "1").arg("--test-threads=1").env_remove("CI");
    if ci {
        cmd.env("CI", "1");
    }
    let out = cmd.output().expect("running the inner suite");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// What the harness printed for `test` (after its aligned `test NAME ... `).
fn line<'a>(out: &'a str, test: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("test ")?.strip_prefix(test)?;
            rest.trim_start().strip_prefix("... ")
        })
        .unwrap_or_else(|| panic!("no line for {test} in:\n{out}"))
}

fn skips_are_ignored_with_their_reason_outside_ci() {
    let (ok, out) = inner(false);
    assert!(!ok, "the inner suite has a failing test:\n{out}");
    assert_eq!(line(&out, "inner_passes"), "ok");
    assert_eq!(
        line(&out, "inner_needs_a_missing_tool"),
        "ignored (strata-testkit-no-such-tool is not installed (apt-get install no-such-package))"
    );
    assert_eq!(
        line(&out, "inner_not_applicable"),
        "ignored (this host is not the kind the test needs)"
    );
    assert_eq!(line(&out, "inner_fails"), "FAILED");
    assert_eq!(line(&out, "inner_partial"), "ok");
    assert!(out.contains("2 passed; 1 failed; 2 ignored"), "{out}");
}

fn missing_components_fail_under_ci() {
    let (ok, out) = inner(true);
    assert!(!ok);
    assert_eq!(line(&out, "inner_needs_a_missing_tool"), "FAILED", "{out}");
    assert_eq!(line(&out, "inner_partial"), "FAILED", "{out}");
    // A host fact CI may have stays ignored, with its reason.
    assert_eq!(
        line(&out, "inner_not_applicable"),
        "ignored (this host is not the kind the test needs)"
    );
    assert!(out.contains("CI must provide it"), "{out}");
    assert!(out.contains("1 passed; 3 failed; 1 ignored"), "{out}");
}

/// Every `[[test]]` with `harness = false` in the workspace, as (crate dir, source file).
fn harnessless_targets(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && !name.starts_with('.') && name != "target" && name != "fuzz" {
                dirs.push(p);
            } else if name == "Cargo.toml" {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                for block in text.split("[[test]]").skip(1) {
                    let block = block.split("\n[").next().unwrap_or("");
                    if !block.contains("harness = false") {
                        continue;
                    }
                    let field = |key: &str| {
                        block.lines().find_map(|l| {
                            let l = l.trim();
                            let v = l.strip_prefix(key)?.trim_start().strip_prefix('=')?;
                            Some(v.trim().trim_matches('"').to_string())
                        })
                    };
                    let src = match (field("path"), field("name")) {
                        (Some(path), _) => path,
                        (None, Some(name)) => format!("tests/{name}.rs"),
                        (None, None) => continue,
                    };
                    found.push(dir.join(src));
                }
            }
        }
    }
    found
}

fn no_harnessless_binary_keeps_test_attributes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let targets = harnessless_targets(&root);
    assert!(
        targets
            .iter()
            .any(|t| t.ends_with("testkit/tests/selfcheck.rs")),
        "the scan found no harness = false targets: {targets:?}"
    );
    for t in &targets {
        let text = std::fs::read_to_string(t).unwrap_or_else(|e| panic!("{}: {e}", t.display()));
        assert!(
            !text.lines().any(|l| l.trim() == "#[test]"),
            "{} is built with harness = false, so its #[test] functions never run: list them \
             in strata_testkit::main! instead",
            t.display()
        );
        assert!(
            text.contains("strata_testkit::main!") || text.contains("strata_testkit::run("),
            "{} is built with harness = false but does not run strata_testkit's harness",
            t.display()
        );
    }
}

fn main() -> std::process::ExitCode {
    if std::env::var_os(INNER).is_some() {
        return strata_testkit::run(vec![
            strata_testkit::trial("inner_passes", inner_passes),
            strata_testkit::trial("inner_needs_a_missing_tool", inner_needs_a_missing_tool),
            strata_testkit::trial("inner_not_applicable", inner_not_applicable),
            strata_testkit::trial("inner_fails", inner_fails),
            strata_testkit::trial("inner_partial", inner_partial),
        ]);
    }
    strata_testkit::run(vec![
        strata_testkit::trial(
            "skips_are_ignored_with_their_reason_outside_ci",
            skips_are_ignored_with_their_reason_outside_ci,
        ),
        strata_testkit::trial(
            "missing_components_fail_under_ci",
            missing_components_fail_under_ci,
        ),
        strata_testkit::trial(
            "no_harnessless_binary_keeps_test_attributes",
            no_harnessless_binary_keeps_test_attributes,
        ),
    ])
}
