//! Strata's test harness for tests that need something the machine may lack: KVM, QEMU's
//! tools, Chromium, root, the Ceph packages.
//!
//! # Why a harness of our own
//! Rust's built-in test harness decides whether a test is ignored when the test is compiled
//! (`#[ignore]`). Whether this machine has `/dev/kvm` or `qemu-img` is known only when the
//! test runs, so a test that found its component missing used to print a notice and return
//! `Ok(())`: the harness counted it as *passed*. The test binaries that need such a component
//! are built with `harness = false` and run through [`libtest_mimic`] (the field's crate for
//! a libtest-compatible harness: same arguments, same output, same `test result:` line), whose
//! runners may end a test as *ignored* at run time with a reason:
//!
//! ```text
//! test tier1_boots_and_checks_its_disk ... ignored, /dev/kvm cannot be opened (No such file or directory)
//! test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out
//! ```
//!
//! # Rules
//! - [`require_kvm`], [`require_tool`] and friends return when the component is there. When it
//!   is missing they end the test: as a **failure under `CI`** (CI installs every tool and runs
//!   on a KVM host, so a missing one is a broken machine, not a reason to pass), and as
//!   *ignored, reason* elsewhere.
//! - [`not_applicable`] ends a test as ignored even under `CI`, for facts of the host that CI
//!   legitimately has — a PVM host where an unmodified Linux guest cannot boot
//!   ([`require_hardware_kvm`]).
//! - [`partial_skip`] lets a test go on without one of its parts; it fails under `CI`.
//! - A skip unwinds with a [`Skip`] payload, so it works from any helper deep inside a test.
//!   Under Rust's own harness such a payload would be a failure, never a pass; [`skip`]
//!   refuses to run outside this harness to say so early.
//!
//! A test binary opts in with `harness = false` in its crate's `Cargo.toml` and lists its tests
//! with [`main!`]; a function left out of the list is dead code, which `clippy -D warnings`
//! rejects. `.ci/run` collects every `ignored` line of every harness into one table.

use std::any::Any;
use std::cell::RefCell;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

pub use libtest_mimic;
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The payload a skipped test unwinds with.
#[derive(Debug, Clone)]
pub struct Skip {
    /// Why the test did not run.
    pub reason: String,
}

/// Whether the tests run in CI (`CI` set to anything but empty, `0` or `false`), where every
/// component a test needs must be present.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

static UNDER_HARNESS: AtomicBool = AtomicBool::new(false);

thread_local! {
    static CURRENT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The name of the test running on this thread, when it runs under [`run`].
pub fn current_test() -> Option<String> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Ends the current test as ignored with `reason`, under `CI` too. For facts of the host that
/// CI may legitimately have (see [`require_hardware_kvm`]).
pub fn not_applicable(reason: &str) -> ! {
    skip(reason)
}

/// Ends the current test because this machine lacks `what`: a failure under `CI`, ignored with
/// that reason elsewhere.
pub fn missing(what: &str) -> ! {
    if in_ci() {
        panic!("CI is set but {what}: CI must provide it (scripts/install-deps.sh), so the test fails instead of skipping");
    }
    skip(what)
}

/// Ends the current test as ignored. Panics (fails the test) when the binary does not run
/// under this harness, where an unwinding skip would read as a failure without its reason.
pub fn skip(reason: &str) -> ! {
    assert!(
        UNDER_HARNESS.load(Ordering::Relaxed),
        "a test skipped ({reason}) outside strata_testkit's harness: give its test target \
         `harness = false` and list its tests with strata_testkit::main!"
    );
    std::panic::panic_any(Skip {
        reason: reason.to_string(),
    })
}

/// Lets a test go on without one of its parts (`what`, and why). Under `CI` the test fails.
pub fn partial_skip(what: &str) {
    if in_ci() {
        panic!("CI is set but part of the test cannot run: {what}");
    }
    let test = current_test().unwrap_or_default();
    eprintln!("SKIPPED (part of {test}): {what}");
}

/// Whether `tool` is there for an optional part of a test: when it is missing, see
/// [`partial_skip`] (a failure under `CI`).
pub fn part_has_tool(tool: &str, package: &str) -> bool {
    let found = have_tool(tool);
    if !found {
        partial_skip(&format!(
            "{tool} is not installed (apt-get install {package})"
        ));
    }
    found
}

/// The error opening /dev/kvm for reading and writing, if any.
pub fn kvm_error() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm cannot be opened ({e})"))
}

/// Whether /dev/kvm can be opened.
pub fn have_kvm() -> bool {
    kvm_error().is_none()
}

/// Whether this host's KVM is PVM (software nested virtualisation, `/sys/module/kvm_pvm`),
/// where guest ring 0 is emulated and an unmodified Linux kernel does not finish booting.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Returns when /dev/kvm can be opened; see [`missing`] otherwise.
pub fn require_kvm() {
    if let Some(e) = kvm_error() {
        missing(&e);
    }
}

/// Returns on a host with hardware KVM. On a PVM host the test is not applicable (ignored,
/// under `CI` too); without /dev/kvm see [`missing`].
pub fn require_hardware_kvm() {
    if is_pvm_host() {
        not_applicable(
            "this host's /dev/kvm is PVM (/sys/module/kvm_pvm): guest ring 0 is emulated and an \
             unmodified Linux kernel does not boot under it; needs hardware KVM",
        );
    }
    require_kvm();
}

/// Whether `tool` is on PATH (found by `sh -c 'command -v TOOL'`, so tools without a harmless
/// `--version` count too).
pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v '{tool}'"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Returns when `tool` is on PATH; see [`missing`] otherwise (`package` names the Debian
/// package that brings it).
pub fn require_tool(tool: &str, package: &str) {
    if !have_tool(tool) {
        missing(&format!(
            "{tool} is not installed (apt-get install {package})"
        ));
    }
}

/// qemu-img and qemu-io (qemu-utils).
pub fn require_qemu_utils() {
    require_tool("qemu-img", "qemu-utils");
    require_tool("qemu-io", "qemu-utils");
}

/// Returns when the test runs as root; see [`missing`] otherwise.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing("root (the test mounts or attaches devices)");
    }
}

/// What a test function may return.
pub trait TestOutcome {
    /// `Err` with the failure's text.
    fn into_result(self) -> Result<(), String>;
}

impl TestOutcome for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Debug> TestOutcome for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| format!("Error: {e:?}"))
    }
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "the test panicked".to_string()
    }
}

/// One test of a [`main!`] list.
pub fn trial<T: TestOutcome + 'static>(name: &'static str, test: fn() -> T) -> Trial {
    Trial::ignorable_test(name, move || {
        CURRENT.with(|c| *c.borrow_mut() = Some(name.to_string()));
        let outcome = catch_unwind(AssertUnwindSafe(|| test().into_result()));
        CURRENT.with(|c| *c.borrow_mut() = None);
        match outcome {
            Ok(Ok(())) => Ok(Completion::Completed),
            Ok(Err(e)) => Err(Failed::from(e)),
            Err(payload) => match payload.downcast_ref::<Skip>() {
                Some(skip) => Ok(Completion::ignored_with(&skip.reason)),
                None => Err(Failed::from(panic_text(payload.as_ref()))),
            },
        }
    })
}

/// Runs `tests` with the arguments libtest takes (filters, `--ignored`, `--test-threads`,
/// `--list`, `--format`), and returns the exit code.
pub fn run(tests: Vec<Trial>) -> ExitCode {
    UNDER_HARNESS.store(true, Ordering::Relaxed);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A skip is an outcome, not a crash: the harness prints it as "ignored, reason".
            if info.payload().downcast_ref::<Skip>().is_none() {
                default(info);
            }
        }));
    });
    let args = Arguments::from_args();
    libtest_mimic::run(&args, tests).exit_code()
}

/// The `main` of a test binary built with `harness = false`: lists its test functions (each
/// returns `()` or `Result<(), E: Debug>`), each optionally behind `#[cfg(...)]`.
///
/// ```text
/// strata_testkit::main!(
///     boots_and_checks_its_disk,
///     #[cfg(feature = "rbd")] runs_on_rbd,
/// );
/// ```
#[macro_export]
macro_rules! main {
    ($($(#[$attr:meta])* $test:ident),* $(,)?) => {
        fn main() -> ::std::process::ExitCode {
            #[allow(unused_mut)]
            let mut tests = ::std::vec::Vec::new();
            $(
                $(#[$attr])*
                tests.push($crate::trial(stringify!($test), $test));
            )*
            $crate::run(tests)
        }
    };
}

/// The dirty ranges `(offset, length)`, merged, of persistent bitmap `name` of the qcow2 image
/// at `path` as QEMU itself exports them: `qemu-nbd -r -B NAME` read by
/// `nbdinfo --map=qemu:dirty-bitmap:NAME` (qemu-utils and libnbd-bin; panics when they fail).
pub fn qemu_dirty_ranges(path: &std::path::Path, name: &str) -> Vec<(u64, u64)> {
    let out = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .args(["--", "[", "qemu-nbd", "-r", "-f", "qcow2", "-B", name])
        .arg(path)
        .arg("]")
        .output()
        .expect("running nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo over qemu-nbd -B {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut dirty: Vec<(u64, u64)> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[2] != "1" {
            continue;
        }
        let (o, l): (u64, u64) = (f[0].parse().expect("offset"), f[1].parse().expect("length"));
        match dirty.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => dirty.push((o, l)),
        }
    }
    dirty
}
