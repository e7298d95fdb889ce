//! Reading a VM run's serial console log: `console.log` in the VM's folder, written by the
//! VMM's monitor process and rotated to `console.old.log` at 16 MiB (`console.json` says where
//! the current file starts), read by byte offset (offsets count from the start of the run,
//! across rotations, so that clients can poll). The live stream comes from the VMM's control
//! socket (`Service::vm_console_stream`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_vmm::process::config::{ConsoleState, CONSOLE_FILE};

use super::vm_runner::io_error;
use super::vms::{ConsoleChunk, VmState};
use super::ServiceResult;

/// Which bytes of a log holding offsets `base..base + len` to return: `(from, to, truncated)`.
fn console_window(
    base: u64,
    len: u64,
    offset: Option<u64>,
    tail: Option<u64>,
    limit: u64,
) -> (u64, u64, bool) {
    let end = base + len;
    let (from, truncated) = match (tail, offset) {
        (Some(t), _) => (end.saturating_sub(t).max(base), false),
        (None, Some(o)) if o < base => (base, true),
        (None, Some(o)) => (o.min(end), false),
        (None, None) => (base, false),
    };
    (from, end.min(from.saturating_add(limit)), truncated)
}

/// Reads a piece of the console log in `dir`.
pub fn read_console_file(
    dir: &Path,
    offset: Option<u64>,
    tail: Option<u64>,
    limit: u64,
) -> ServiceResult<ConsoleChunk> {
    let base = ConsoleState::load(dir).base;
    let path = dir.join(CONSOLE_FILE);
    let file = match File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("Opening", &path, e)),
    };
    let len = match &file {
        Some(f) => f
            .metadata()
            .map_err(|e| io_error("Reading", &path, e))?
            .len(),
        None => 0,
    };
    let (from, to, truncated) = console_window(base, len, offset, tail, limit);
    let mut buf = vec![0u8; (to - from) as usize];
    if let Some(f) = &file {
        f.read_exact_at(&mut buf, from - base)
            .map_err(|e| io_error("Reading", &path, e))?;
    }
    Ok(ConsoleChunk {
        data: String::from_utf8_lossy(&buf).into_owned(),
        offset: from,
        next_offset: to,
        start: base,
        end: base + len,
        truncated,
        state: VmState::Running,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_windows_follow_offsets_tails_and_limits() {
        // Log holds offsets 100..150.
        assert_eq!(console_window(100, 50, None, None, 1000), (100, 150, false));
        assert_eq!(
            console_window(100, 50, Some(120), None, 1000),
            (120, 150, false)
        );
        assert_eq!(
            console_window(100, 50, Some(120), None, 10),
            (120, 130, false)
        );
        assert_eq!(
            console_window(100, 50, Some(10), None, 1000),
            (100, 150, true)
        );
        assert_eq!(
            console_window(100, 50, Some(500), None, 1000),
            (150, 150, false)
        );
        assert_eq!(
            console_window(100, 50, None, Some(5), 1000),
            (145, 150, false)
        );
        assert_eq!(
            console_window(100, 50, None, Some(500), 1000),
            (100, 150, false)
        );
        assert_eq!(console_window(0, 0, None, None, 1000), (0, 0, false));
        assert_eq!(
            console_window(0, 10, Some(u64::MAX), None, u64::MAX),
            (10, 10, false)
        );
    }
}
