//! A thread under its seccomp filter may free memory: glibc's malloc, trimming a thread arena's
//! heap for the first time in the process, opens /proc/sys/vm/overcommit_memory
//! (`check_may_shrink_heap`) — a call no filter allows, which killed a NIC's worker thread (and
//! with it the VMM) when it stopped and freed its frame buffers.
//!
//! The test runs its own binary again as a fresh process (the filters would otherwise stay on
//! the test process, and a fresh process has no cached answer from glibc): the child switches
//! seccomp on, enters the device-worker filter on a new thread, allocates and frees arena memory
//! past the trim threshold, and exits; the parent expects a clean exit, not SIGSYS.

use std::time::Duration;

fn child() -> i32 {
    if strata_vmm::sandbox::enable_seccomp(None).is_err() {
        return 2;
    }
    let worker = std::thread::spawn(|| {
        strata_vmm::sandbox::enter(strata_vmm::sandbox::Role::DeviceWorker);
        // Below the mmap threshold (128 KiB), so from the thread's arena; together far above
        // the trim threshold, so freeing them trims the arena's heap.
        let bufs: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 70_000]).collect();
        let sum: u64 = bufs.iter().map(|b| u64::from(b[0])).sum();
        drop(bufs);
        std::hint::black_box(sum);
    });
    if worker.join().is_err() {
        return 3;
    }
    0
}

const CHILD: &str = "STRATA_SECCOMP_MALLOC_CHILD";

/// The child's part (a no-op unless the parent started this binary for it).
#[test]
fn child_frees_arena_memory_under_its_filter() {
    if std::env::var_os(CHILD).is_some() {
        std::process::exit(child());
    }
}

#[test]
fn a_sandboxed_thread_frees_arena_memory_without_dying() {
    let exe = std::env::current_exe().expect("the test binary");
    let mut c = std::process::Command::new(exe)
        .args(["--exact", "child_frees_arena_memory_under_its_filter"])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("running the test binary again");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = c.try_wait().expect("waiting for the child") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child did not finish"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.success(),
        "the sandboxed child died: {status:?} (signal {:?})",
        status.signal()
    );
}
