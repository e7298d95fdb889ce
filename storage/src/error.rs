//! The block layer's error type.
//!
//! One enum for the whole crate: callers above (the VMM, backup, the API) map its kinds to
//! their own status codes (virtio `IOERR`/`UNSUPP`, HTTP 400/404/409/507), so the variants are
//! chosen by what a caller does about them, not by where they arise.

use std::io;
use std::path::PathBuf;

/// Result alias used throughout the block layer.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything that can go wrong in the block layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call failed; `context` says what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What the failing call was for, e.g. "Reading /var/lib/a.img".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The caller asked for something malformed (a bad size, an unaligned offset, a bad name).
    #[error("{0}")]
    InvalidInput(String),
    /// The request reaches outside the device.
    #[error(
        "Request at offset {offset} of length {len} is beyond the end of the device ({size} bytes)"
    )]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// The device or image is open read-only.
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// A feature this device or format does not implement; the message names the feature.
    #[error("Unsupported: {0}")]
    Unsupported(String),
    /// On-disk data is inconsistent or malformed.
    #[error("Corrupt {what}: {detail}")]
    Corrupt {
        /// What is damaged: an image path, a metadata area.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// No space is left (a full thin pool, a full file system).
    #[error("No space left: {0}")]
    OutOfSpace(String),
    /// A file or object does not exist.
    #[error("{} does not exist", .0.display())]
    NotFound(PathBuf),
    /// Something with that name or path already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Another process or operation holds what we need.
    #[error("{0} is busy")]
    Busy(String),
    /// The I/O queue is shut down or the device is gone (after a simulated power loss, say).
    #[error("Device is unavailable: {0}")]
    Unavailable(String),
    /// The image or request would reach something the caller may not use: an appliance image
    /// that names another file (a backing file, a parent disk, extent files).
    #[error("Refused: {0}")]
    Forbidden(String),
    /// The caller asked a long operation to stop, and it did.
    #[error("Cancelled")]
    Cancelled,
}

impl StorageError {
    /// Wraps an `io::Error` with a description of what we were doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        // Classify the kinds callers act upon so that they need not dig into errno.
        let context = context.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::OutOfSpace(context),
            Some(libc::EROFS) => StorageError::ReadOnly(context),
            // A size beyond what the file system can hold is a bad request, not a failure.
            Some(libc::EFBIG) => {
                StorageError::InvalidInput(format!("{context}: too large for the file system"))
            }
            _ => StorageError::Io { context, source },
        }
    }

    /// Builds a [`StorageError::Corrupt`].
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        StorageError::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// The closest errno, for callers that speak errno (virtio, FUSE, vhost-user).
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StorageError::InvalidInput(_) | StorageError::OutOfRange { .. } => libc::EINVAL,
            StorageError::ReadOnly(_) => libc::EROFS,
            StorageError::Unsupported(_) => libc::EOPNOTSUPP,
            StorageError::Corrupt { .. } => libc::EIO,
            StorageError::OutOfSpace(_) => libc::ENOSPC,
            StorageError::NotFound(_) => libc::ENOENT,
            StorageError::AlreadyExists(_) => libc::EEXIST,
            StorageError::Busy(_) => libc::EBUSY,
            StorageError::Unavailable(_) => libc::ENODEV,
            StorageError::Forbidden(_) => libc::EACCES,
            StorageError::Cancelled => libc::ECANCELED,
        }
    }

    /// A copy of this error for fanning one failure out to several waiters.
    ///
    /// `io::Error` is not `Clone`; the copy keeps its errno and message.
    pub fn duplicate(&self) -> Self {
        match self {
            StorageError::Io { context, source } => StorageError::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            StorageError::InvalidInput(s) => StorageError::InvalidInput(s.clone()),
            StorageError::OutOfRange { offset, len, size } => StorageError::OutOfRange {
                offset: *offset,
                len: *len,
                size: *size,
            },
            StorageError::ReadOnly(s) => StorageError::ReadOnly(s.clone()),
            StorageError::Unsupported(s) => StorageError::Unsupported(s.clone()),
            StorageError::Corrupt { what, detail } => StorageError::Corrupt {
                what: what.clone(),
                detail: detail.clone(),
            },
            StorageError::OutOfSpace(s) => StorageError::OutOfSpace(s.clone()),
            StorageError::NotFound(p) => StorageError::NotFound(p.clone()),
            StorageError::AlreadyExists(s) => StorageError::AlreadyExists(s.clone()),
            StorageError::Busy(s) => StorageError::Busy(s.clone()),
            StorageError::Unavailable(s) => StorageError::Unavailable(s.clone()),
            StorageError::Forbidden(s) => StorageError::Forbidden(s.clone()),
            StorageError::Cancelled => StorageError::Cancelled,
        }
    }

    /// Builds an error from a raw errno returned by the kernel (an io_uring completion, say).
    pub fn from_errno(context: impl Into<String>, errno: i32) -> Self {
        Self::io(context, io::Error::from_raw_os_error(errno))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_classified_as_out_of_space() {
        let e = StorageError::from_errno("Writing x", libc::ENOSPC);
        assert!(matches!(e, StorageError::OutOfSpace(_)));
        assert_eq!(e.errno(), libc::ENOSPC);
    }

    #[test]
    fn duplicate_keeps_errno_and_message() {
        let e = StorageError::from_errno("Reading y", libc::EIO);
        let d = e.duplicate();
        assert_eq!(d.errno(), libc::EIO);
        assert_eq!(d.to_string(), e.to_string());
    }
}
