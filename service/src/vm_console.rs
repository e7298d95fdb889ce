//! A VM run's serial console log: `console.log` in the VM's folder, appended to by the serial
//! device, rotated to `console.old.log` at [`CONSOLE_LOG_LIMIT`] bytes, and read by byte offset
//! (offsets count from the start of the run, across rotations, so that clients can poll).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::vm_runner::{io_error, lock, RunRecord};
use super::vms::{ConsoleChunk, VmState};
use super::ServiceResult;

/// The console log is rotated (to `console.old.log`) when it reaches this size.
pub const CONSOLE_LOG_LIMIT: u64 = 16 << 20;
/// The current log's file name.
pub const CONSOLE_FILE: &str = "console.log";
/// The previous log's file name.
pub const OLD_CONSOLE_FILE: &str = "console.old.log";

/// The console log's end offset.
pub fn console_end(dir: &Path, record: Option<&RunRecord>) -> u64 {
    let len = std::fs::metadata(dir.join(CONSOLE_FILE)).map_or(0, |m| m.len());
    record.map_or(0, |r| r.console_base) + len
}

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

/// Reads a piece of the console log in `dir` whose first byte has offset `base`.
pub fn read_console_file(
    dir: &Path,
    base: u64,
    offset: Option<u64>,
    tail: Option<u64>,
    limit: u64,
) -> ServiceResult<ConsoleChunk> {
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

/// The console log of a run: appends, rotating at [`CONSOLE_LOG_LIMIT`].
#[derive(Debug)]
pub struct ConsoleLog {
    dir: PathBuf,
    file: File,
    len: u64,
    base: u64,
    record: Arc<Mutex<RunRecord>>,
}

impl ConsoleLog {
    /// Starts a new log in `dir`, keeping the previous one as `console.old.log`.
    pub fn create(dir: &Path, record: Arc<Mutex<RunRecord>>) -> ServiceResult<ConsoleLog> {
        let path = dir.join(CONSOLE_FILE);
        if path.exists() {
            let old = dir.join(OLD_CONSOLE_FILE);
            std::fs::rename(&path, &old).map_err(|e| io_error("Renaming", &path, e))?;
        }
        let file = File::create(&path).map_err(|e| io_error("Creating", &path, e))?;
        Ok(ConsoleLog {
            dir: dir.to_path_buf(),
            file,
            len: 0,
            base: 0,
            record,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(CONSOLE_FILE);
        std::fs::rename(&path, self.dir.join(OLD_CONSOLE_FILE))?;
        self.file = File::create(&path)?;
        self.base += self.len;
        self.len = 0;
        let mut record = lock(&self.record);
        record.console_base = self.base;
        if let Err(e) = record.save(&self.dir) {
            tracing::warn!(error = %e, "recording the console log's rotation failed");
        }
        Ok(())
    }

    /// The log's end offset.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }

    /// A piece of the log.
    pub fn read(
        &self,
        offset: Option<u64>,
        tail: Option<u64>,
        limit: u64,
    ) -> ServiceResult<ConsoleChunk> {
        read_console_file(&self.dir, self.base, offset, tail, limit)
    }
}

/// The serial device's sink: the run's console log.
#[derive(Debug)]
pub struct ConsoleWriter(pub Arc<Mutex<ConsoleLog>>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut log = lock(&self.0);
        if log.len >= CONSOLE_LOG_LIMIT {
            log.rotate()?;
        }
        log.file.write_all(buf)?;
        log.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

    #[test]
    fn the_console_log_rotates_and_keeps_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let record = Arc::new(Mutex::new(RunRecord {
            state: VmState::Running,
            started_at: 0,
            ended_at: None,
            exit_reason: None,
            reboots: 0,
            pid: std::process::id(),
            console_base: 0,
        }));
        let log = Arc::new(Mutex::new(
            ConsoleLog::create(dir.path(), record.clone()).unwrap(),
        ));
        let mut w = ConsoleWriter(log.clone());
        w.write_all(b"hello ").unwrap();
        let before = std::fs::read(dir.path().join(CONSOLE_FILE)).unwrap();
        lock(&log).len = CONSOLE_LOG_LIMIT; // pretend the log is full
        w.write_all(b"world").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(OLD_CONSOLE_FILE)).unwrap(),
            before
        );
        let chunk = lock(&log).read(Some(0), None, 1000).unwrap();
        assert!(chunk.truncated);
        assert_eq!(chunk.data, "world");
        assert_eq!(chunk.offset, CONSOLE_LOG_LIMIT);
        assert_eq!(chunk.next_offset, CONSOLE_LOG_LIMIT + 5);
        // Another process sees the same offsets through the record.
        let saved = RunRecord::load(dir.path()).unwrap().unwrap();
        assert_eq!(saved.console_base, CONSOLE_LOG_LIMIT);
        assert_eq!(console_end(dir.path(), Some(&saved)), CONSOLE_LOG_LIMIT + 5);
    }
}
