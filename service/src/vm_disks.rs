//! Disks the supervisor serves to its VMM processes: logical volumes (their pool's metadata has
//! one owner, this process) and images with dirty-bitmap sidecars (the sandboxed VMM cannot
//! rewrite files). Each one is an export with a secret name on an NBD server listening on a
//! private Unix socket (`DATA/run/vm-disks.sock`, mode 0600 in a 0700 folder); the supervisor
//! connects, does the handshake, and hands the connected socket to the VMM, which speaks only
//! the transmission phase (`strata_vmm::process::ServedDisk`). The VMM is an untrusted client,
//! which the NBD server is built for; the supervisor never maps guest memory.
//!
//! An export lives as long as its [`ServedDisks`]: dropping it removes the exports, which
//! closes the devices and releases their holds (volume groups stay open in the service).

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_nbd::export::{Access, ExportConfig, ExportRegistry};
use strata_nbd::server::{Limits, Listen, ServerConfig, ServerHandle};
use strata_storage::BlockDevice;
use strata_vmm::process::{client_handshake, ExportFacts};

use super::volumes::Resolved;
use super::{ServiceError, ServiceResult};

/// The NBD server of this process's VM disks.
pub(super) struct DiskServer {
    registry: Arc<ExportRegistry>,
    socket: PathBuf,
    _handle: ServerHandle,
}

impl std::fmt::Debug for DiskServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskServer")
            .field("socket", &self.socket)
            .finish()
    }
}

/// The disk server, started on first use.
#[derive(Debug, Default)]
pub(super) struct DiskServerSlot(Mutex<Option<Arc<DiskServer>>>);

impl DiskServerSlot {
    /// The server, listening in `run_dir` (created 0700).
    pub(super) fn get(&self, run_dir: PathBuf) -> ServiceResult<Arc<DiskServer>> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&run_dir)
                .map_err(|e| {
                    ServiceError::internal(format!("Creating {}: {e}", run_dir.display()))
                })?;
        }
        let socket = run_dir.join("vm-disks.sock");
        let registry = ExportRegistry::new();
        let handle = strata_nbd::server::start(
            ServerConfig {
                listen: vec![Listen::Unix(socket.clone())],
                tls: None,
                limits: Limits {
                    max_connections: 1024,
                    ..Limits::default()
                },
            },
            registry.clone(),
        )
        .map_err(|e| ServiceError::internal(format!("Starting the VM disk server: {e}")))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| ServiceError::internal(format!("Protecting {}: {e}", socket.display())),
            )?;
        }
        let server = Arc::new(DiskServer {
            registry,
            socket,
            _handle: handle,
        });
        *slot = Some(server.clone());
        Ok(server)
    }
}

/// One disk handed to a VMM.
#[derive(Debug)]
pub(super) struct ServedDisk {
    /// The connected socket for the VMM (past the handshake).
    pub(super) stream: UnixStream,
    /// What the handshake said.
    pub(super) facts: ExportFacts,
}

/// The exports of one VM; removed when dropped.
#[derive(Debug)]
pub(super) struct ServedDisks {
    server: Arc<DiskServer>,
    exports: Vec<String>,
}

impl ServedDisks {
    pub(super) fn new(server: Arc<DiskServer>) -> ServedDisks {
        ServedDisks {
            server,
            exports: Vec::new(),
        }
    }

    /// Exports `device` (kept usable by `resolved`) under a fresh secret name and connects to
    /// it.
    pub(super) fn serve(
        &mut self,
        device: Arc<dyn BlockDevice>,
        resolved: Resolved,
        description: String,
        read_only: bool,
    ) -> ServiceResult<ServedDisk> {
        let name = secret_name()?;
        self.server
            .registry
            .add(ExportConfig {
                name: name.clone(),
                description,
                device,
                read_only,
                bitmaps: None,
                access: Access::SecretName,
                keep_alive: Some(Box::new(resolved)),
            })
            .map_err(|e| ServiceError::internal(format!("Exporting a VM disk: {e}")))?;
        self.exports.push(name.clone());
        let mut stream = UnixStream::connect(&self.server.socket).map_err(|e| {
            ServiceError::internal(format!("Connecting to the VM disk server: {e}"))
        })?;
        let timeout = Some(std::time::Duration::from_secs(10));
        let _ = stream.set_read_timeout(timeout);
        let facts = client_handshake(&mut stream, &name)
            .map_err(|e| ServiceError::internal(format!("Opening a VM disk: {e}")))?;
        let _ = stream.set_read_timeout(None);
        Ok(ServedDisk { stream, facts })
    }
}

impl Drop for ServedDisks {
    fn drop(&mut self) {
        for name in self.exports.drain(..) {
            if let Err(e) = self.server.registry.remove(&name) {
                tracing::warn!(error = %e, "removing a VM disk export failed");
            }
        }
    }
}

fn secret_name() -> ServiceResult<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)
        .map_err(|e| ServiceError::internal(format!("Making a secret name: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
