//! Errors of the installer. Each names the disk, answer or tool concerned and, where there is
//! one, what the user can do about it.

use std::path::PathBuf;

/// What stopped an installation.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// No disk the installer could use was found.
    #[error("No disk found to install on ({0})")]
    NoDisk(String),
    /// `disk = auto` but several disks qualify.
    #[error("Several disks could take the installation ({0}); name one with disk=")]
    SeveralDisks(String),
    /// The named disk does not exist or is not a whole disk.
    #[error("Disk {0} not found (disks: {1})")]
    UnknownDisk(String, String),
    /// The disk is smaller than the layout needs.
    #[error("Disk {disk} is too small: {size}; Strata needs at least {min}")]
    DiskTooSmall {
        /// The disk.
        disk: String,
        /// Its size, formatted.
        size: String,
        /// The minimum, formatted.
        min: String,
    },
    /// The target disk holds the running installer (the ISO written to it, or the answer or
    /// token medium).
    #[error("Disk {disk} holds the installer itself ({why}); choose another disk")]
    InstallerDisk {
        /// The disk.
        disk: String,
        /// Which part of the installer lives there.
        why: String,
    },
    /// A file system of the disk is mounted.
    #[error("Disk {disk} is in use: {what} is mounted at {mountpoint}")]
    DiskInUse {
        /// The disk.
        disk: String,
        /// The mounted device.
        what: String,
        /// Where.
        mountpoint: String,
    },
    /// The disk holds a Strata volume group or an earlier Strata installation.
    #[error("Disk {disk} holds {what}; answer wipe=yes to replace it (its data will be lost)")]
    ExistingStrata {
        /// The disk.
        disk: String,
        /// What was found.
        what: String,
    },
    /// The disk is read-only.
    #[error("Disk {0} is read-only")]
    ReadOnlyDisk(String),
    /// An answer is malformed or unknown.
    #[error("Answer {key}={value:?}: {reason}")]
    BadAnswer {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The answer file cannot be read or parsed.
    #[error("Answer file {path}: {reason}")]
    AnswerFile {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line number.
        reason: String,
    },
    /// Interactive mode without a terminal, or the operator declined.
    #[error("{0}")]
    Aborted(String),
    /// An external tool is missing from the image.
    #[error("{tool} is missing from this system: {err}")]
    ToolMissing {
        /// The tool.
        tool: String,
        /// The error from exec.
        err: std::io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {output}")]
    ToolFailed {
        /// The command line, shortened to the tool and its main arguments.
        tool: String,
        /// Its exit status.
        status: String,
        /// The end of its error output.
        output: String,
    },
    /// A file operation failed.
    #[error("{what} {path}: {err}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// Something expected did not show up in time (a partition device node).
    #[error("{0}")]
    Timeout(String),
    /// `token-to=vfat:LABEL` but no FAT volume has that label.
    #[error("No FAT volume labelled {0} is attached for the first API token (token-to=vfat:{0})")]
    NoTokenVolume(String),
    /// The default volume group or thin pool could not be created.
    #[error("Creating the default storage: {0}")]
    Storage(String),
    /// The first API token could not be created.
    #[error("Creating the first API token: {0}")]
    Token(String),
}

impl InstallError {
    /// An I/O error on a path.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, err: std::io::Error) -> InstallError {
        InstallError::Io {
            what,
            path: path.into(),
            err,
        }
    }

    /// A malformed answer.
    pub fn answer(key: &str, value: &str, reason: impl Into<String>) -> InstallError {
        InstallError::BadAnswer {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result type of the installer.
pub type InstallResult<T> = Result<T, InstallError>;
