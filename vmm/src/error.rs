//! The VMM's error type.

use std::io;

/// Result alias for the VMM.
pub type Result<T, E = VmmError> = std::result::Result<T, E>;

/// What can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be opened.
    #[error("Cannot open /dev/kvm (is KVM enabled and are you allowed to use it?): {0}")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something the VMM needs.
    #[error("KVM lacks a needed capability: {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed; the string says which.
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be set up.
    #[error("Guest memory: {0}")]
    Memory(String),
    /// The kernel, initrd or guest image could not be loaded.
    #[error("Loading the guest: {0}")]
    Boot(String),
    /// A configuration value is invalid.
    #[error("{0}")]
    Config(String),
    /// A disk could not be attached.
    #[error("Disk {path}: {source}")]
    Disk {
        /// The disk's path or name.
        path: String,
        /// What went wrong.
        #[source]
        source: strata_storage::StorageError,
    },
    /// An operating-system call failed.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// The vhost-user back-end failed.
    #[error("vhost-user: {0}")]
    VhostUser(String),
}

impl VmmError {
    /// Wraps an `io::Error` with what we were doing.
    pub fn io(context: impl Into<String>, e: io::Error) -> VmmError {
        VmmError::Io(context.into(), e)
    }
}
