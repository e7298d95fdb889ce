//! The monitor: the VMM process's parent, outside its pid namespace and sandbox. It keeps the
//! console log (reading the VMM's console pipe, rotating the file at [`CONSOLE_LOG_LIMIT`]),
//! collects what the VMM says on its note pipe (its outcome; a seccomp violation), waits for
//! it, and writes the exit record. It parses nothing the guest wrote: console bytes go to the
//! file as they come. It kills the VMM if the VM's folder is removed (a VM nobody can see or
//! stop any more).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::config::{
    now_secs, write_atomically, ConsoleState, ExitRecord, Outcome, VmmConfig, CONSOLE_FILE,
    CONSOLE_LOG_LIMIT, CONSOLE_STATE_FILE, EXIT_FILE, OLD_CONSOLE_FILE,
};
use super::NoteLine;

/// Most note bytes kept.
const MAX_NOTES: usize = 64 << 10;

/// The console log of a run.
struct ConsoleLog {
    dir: PathBuf,
    file: File,
    len: u64,
    base: u64,
}

impl ConsoleLog {
    /// Starts the run's log, keeping the previous one as the old log.
    fn create(dir: &Path) -> std::io::Result<ConsoleLog> {
        let path = dir.join(CONSOLE_FILE);
        if path.exists() {
            std::fs::rename(&path, dir.join(OLD_CONSOLE_FILE))?;
        }
        let log = ConsoleLog {
            dir: dir.to_path_buf(),
            file: create_private(&path)?,
            len: 0,
            base: 0,
        };
        log.save_state()?;
        Ok(log)
    }

    fn save_state(&self) -> std::io::Result<()> {
        let state = ConsoleState { base: self.base };
        let json = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join(CONSOLE_STATE_FILE), &json)
    }

    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.len >= CONSOLE_LOG_LIMIT {
            let path = self.dir.join(CONSOLE_FILE);
            std::fs::rename(&path, self.dir.join(OLD_CONSOLE_FILE))?;
            self.file = create_private(&path)?;
            self.base += self.len;
            self.len = 0;
            self.save_state()?;
        }
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// One pipe the monitor reads.
struct Pipe {
    file: Option<File>,
}

impl Pipe {
    fn read_some(&mut self, buf: &mut [u8]) -> Option<usize> {
        let f = self.file.as_mut()?;
        match f.read(buf) {
            Ok(0) | Err(_) => {
                self.file = None;
                None
            }
            Ok(n) => Some(n),
        }
    }
}

/// Runs the monitor until VMM process `child` has ended; writes the exit record.
pub fn run(cfg: &VmmConfig, child: libc::pid_t, console: OwnedFd, notes: OwnedFd) {
    let dir_handle = File::open(&cfg.dir).ok();
    let mut log = match ConsoleLog::create(&cfg.dir) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("strata vmm monitor: cannot keep the console log: {e}");
            None
        }
    };
    let mut console = Pipe {
        file: Some(File::from(console)),
    };
    let mut notes_pipe = Pipe {
        file: Some(File::from(notes)),
    };
    let mut note_bytes: Vec<u8> = Vec::new();
    let mut extra_notes: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    while console.file.is_some() || notes_pipe.file.is_some() {
        let mut fds: Vec<libc::pollfd> = [&console, &notes_pipe]
            .iter()
            .map(|p| libc::pollfd {
                fd: p.file.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll(2) on a local array of pollfds (negative fds are ignored).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n == 0 {
            if folder_removed(dir_handle.as_ref()) {
                extra_notes.push("the VM's folder was removed; the monitor stopped the VM".into());
                // SAFETY: kill(2) of our own child.
                unsafe { libc::kill(child, libc::SIGKILL) };
            }
            continue;
        }
        if fds[0].revents != 0 {
            if let Some(k) = console.read_some(&mut buf) {
                if let Some(l) = log.as_mut() {
                    if let Err(e) = l.append(&buf[..k]) {
                        eprintln!("strata vmm monitor: writing the console log: {e}");
                        log = None;
                    }
                }
            }
        }
        if fds[1].revents != 0 {
            if let Some(k) = notes_pipe.read_some(&mut buf) {
                let room = MAX_NOTES.saturating_sub(note_bytes.len());
                note_bytes.extend_from_slice(&buf[..k.min(room)]);
            }
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is a local.
    let waited = unsafe { libc::waitpid(child, &mut status, 0) };
    let (exit_code, signal) = if waited != child {
        (None, None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (Some(libc::WEXITSTATUS(status)), None)
    };
    let (outcome, mut notes) = parse_notes(&note_bytes);
    notes.extend(extra_notes);
    let record = ExitRecord {
        run_id: cfg.run_id.clone(),
        vmm_pid: u32::try_from(child).unwrap_or(0),
        ended_at: now_secs(),
        exit_code,
        signal,
        outcome,
        notes,
    };
    match serde_json::to_vec_pretty(&record) {
        Ok(json) => {
            if let Err(e) = write_atomically(&cfg.dir.join(EXIT_FILE), &json) {
                eprintln!("strata vmm monitor: writing the exit record: {e}");
            }
        }
        Err(e) => eprintln!("strata vmm monitor: encoding the exit record: {e}"),
    }
}

/// Whether the folder behind `dir` has been removed.
fn folder_removed(dir: Option<&File>) -> bool {
    dir.and_then(|d| d.metadata().ok())
        .is_some_and(|m| m.nlink() == 0)
}

/// The VMM's outcome (its last outcome line) and its other notes.
fn parse_notes(bytes: &[u8]) -> (Option<Outcome>, Vec<String>) {
    let mut outcome = None;
    let mut notes = Vec::new();
    for line in String::from_utf8_lossy(bytes).lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<NoteLine>(line) {
            Ok(NoteLine::Outcome(o)) => outcome = Some(o),
            Ok(NoteLine::Note(n)) => notes.push(n),
            Err(_) => notes.push(line.to_string()),
        }
    }
    (outcome, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::config::EndState;

    #[test]
    fn notes_give_the_last_outcome_and_keep_plain_lines() {
        let o = Outcome {
            state: EndState::Stopped,
            reason: "guest powered off".into(),
            reboots: 2,
        };
        let mut bytes = serde_json::to_vec(&NoteLine::Note("a warning".into())).unwrap();
        bytes.push(b'\n');
        bytes.extend_from_slice(b"seccomp: a vcpu thread (tid 7) made system call 41\n");
        bytes.extend(serde_json::to_vec(&NoteLine::Outcome(o.clone())).unwrap());
        let (outcome, notes) = parse_notes(&bytes);
        assert_eq!(outcome, Some(o));
        assert_eq!(notes.len(), 2);
        assert!(notes[1].starts_with("seccomp:"));
    }

    #[test]
    fn the_console_log_rotates_and_records_its_base() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONSOLE_FILE), b"last run").unwrap();
        let mut log = ConsoleLog::create(dir.path()).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(OLD_CONSOLE_FILE)).unwrap(),
            b"last run"
        );
        log.append(b"abc").unwrap();
        log.len = CONSOLE_LOG_LIMIT; // pretend it is full
        log.append(b"def").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(CONSOLE_FILE)).unwrap(),
            b"def"
        );
        assert_eq!(ConsoleState::load(dir.path()).base, CONSOLE_LOG_LIMIT);
    }
}
