//! Connections to a Ceph cluster (`rados_t`) and pool handles (`rados_ioctx_t`).
//!
//! A connection is made from a configuration file, a user and optionally a keyring, and shared
//! by everything in the process that names the same three (a VM with three disks on one cluster
//! holds one connection). Pool handles are made with `FULL_TRY` set, so a write into a full pool
//! or a pool over its quota fails with `EDQUOT`/`ENOSPC` (our `OutOfSpace`) instead of waiting,
//! possibly forever, for space: the same clean error a full thin pool gives. librbd's cache is
//! off for Strata's connections (see `connect_new`).

use std::collections::HashMap;
use std::ffi::c_char;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use super::ffi::{api, check, cstr, Api, IoCtxT, RadosT};
use crate::error::{Result, StorageError};

/// How to reach a cluster: what `strata vg create-rbd` records.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterSpec {
    /// The Ceph configuration file (monitor addresses and client options).
    pub conf: PathBuf,
    /// The user, without `client.` (e.g. `admin`).
    pub user: String,
    /// A keyring file, when the configuration does not name one.
    pub keyring: Option<PathBuf>,
}

/// Seconds a connection attempt may take before it fails (librados waits 300 by default).
const CONNECT_TIMEOUT_SECS: &str = "20";
/// Seconds a monitor command may take.
const MON_OP_TIMEOUT_SECS: &str = "30";

/// A connected cluster handle. See the module documentation.
pub struct Cluster {
    api: &'static Api,
    handle: RadosT,
    spec: ClusterSpec,
}

// SAFETY: librados cluster handles may be used from any thread concurrently (librados is
// thread-safe; the handle is only read after `rados_connect`).
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("spec", &self.spec).finish()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2; every pool and image made from it holds
        // an Arc of this connection, so none is left.
        unsafe { (self.api.rados_shutdown)(self.handle) };
    }
}

impl Cluster {
    /// The connection for `spec`: an existing one of this process, or a new one.
    pub fn connect(spec: &ClusterSpec) -> Result<Arc<Cluster>> {
        static OPEN: Mutex<Option<HashMap<ClusterSpec, Weak<Cluster>>>> = Mutex::new(None);
        let mut open = crate::sync::lock(&OPEN);
        let map = open.get_or_insert_with(HashMap::new);
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(c) = map.get(spec).and_then(Weak::upgrade) {
            return Ok(c);
        }
        let c = Arc::new(Cluster::connect_new(spec)?);
        map.insert(spec.clone(), Arc::downgrade(&c));
        Ok(c)
    }

    fn connect_new(spec: &ClusterSpec) -> Result<Cluster> {
        let api = api()?;
        if !spec.conf.is_file() {
            return Err(StorageError::NotFound(spec.conf.clone()));
        }
        let name = cstr(&format!("client.{}", spec.user))?;
        let cluster_name = cstr("ceph")?;
        let mut handle: RadosT = std::ptr::null_mut();
        // SAFETY: the out-pointer is valid; the names are NUL-terminated and outlive the call.
        let r =
            unsafe { (api.rados_create2)(&mut handle, cluster_name.as_ptr(), name.as_ptr(), 0) };
        check(r, || {
            format!("Creating a Ceph client for client.{}", spec.user)
        })?;
        // From here on `c` owns the handle and shuts it down on every error path.
        let c = Cluster {
            api,
            handle,
            spec: spec.clone(),
        };
        let conf = cstr(&spec.conf.to_string_lossy())?;
        // SAFETY: a valid, not yet connected handle and a NUL-terminated path.
        let r = unsafe { (api.rados_conf_read_file)(c.handle, conf.as_ptr()) };
        check(r, || {
            format!("Reading Ceph configuration {}", spec.conf.display())
        })?;
        if let Some(k) = &spec.keyring {
            c.set("keyring", &k.to_string_lossy())?;
        }
        c.set("client_mount_timeout", CONNECT_TIMEOUT_SECS)?;
        // No librbd cache: a write completes when the OSDs have it, as on a local volume opened
        // with O_DIRECT, and its errors (a full pool) come back with it rather than at a later
        // flush or never.
        c.set("rbd_cache", "false")?;
        c.set("rados_mon_op_timeout", MON_OP_TIMEOUT_SECS)?;
        // SAFETY: a configured, not yet connected handle.
        let r = unsafe { (api.rados_connect)(c.handle) };
        check(r, || {
            format!(
                "Connecting to the Ceph cluster of {} as client.{}",
                spec.conf.display(),
                spec.user
            )
        })?;
        Ok(c)
    }

    fn set(&self, option: &str, value: &str) -> Result<()> {
        let (o, v) = (cstr(option)?, cstr(value)?);
        // SAFETY: a valid handle before connecting; both strings are NUL-terminated.
        let r = unsafe { (self.api.rados_conf_set)(self.handle, o.as_ptr(), v.as_ptr()) };
        check(r, || format!("Setting Ceph option {option}")).map(|_| ())
    }

    /// How this connection was made.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Runs a monitor command (JSON, as `ceph --format json` sends it); returns its output.
    pub fn mon_command(&self, json: &str) -> Result<String> {
        let cmd = cstr(json)?;
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut out_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        let (mut status, mut status_len): (*mut c_char, usize) = (std::ptr::null_mut(), 0);
        // SAFETY: one valid command string; the out-pointers are valid and the buffers they
        // receive are freed below with rados_buffer_free.
        let r = unsafe {
            (self.api.rados_mon_command)(
                self.handle,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        // SAFETY: librados returned these buffers with their lengths (or NULL).
        let (text, message) = unsafe {
            (
                take_buffer(self.api, out, out_len),
                take_buffer(self.api, status, status_len),
            )
        };
        check(r, || {
            format!("Ceph monitor command {json} failed: {message}")
        })?;
        Ok(text)
    }

    /// A handle on pool `name`.
    pub fn pool(self: &Arc<Cluster>, name: &str) -> Result<Pool> {
        let n = cstr(name)?;
        let mut io: IoCtxT = std::ptr::null_mut();
        // SAFETY: a connected handle, a NUL-terminated name and a valid out-pointer.
        let r = unsafe { (self.api.rados_ioctx_create)(self.handle, n.as_ptr(), &mut io) };
        check(r, || format!("Ceph pool {name}"))?;
        // SAFETY: a valid pool handle; FULL_TRY makes writes into a full pool fail instead of
        // waiting (see the module documentation).
        unsafe { (self.api.rados_set_pool_full_try)(io) };
        Ok(Pool {
            cluster: self.clone(),
            io,
            name: name.to_string(),
        })
    }
}

/// Copies and frees a buffer librados allocated.
///
/// # Safety
/// `p` is NULL or a buffer of `len` bytes from librados, not used after this call.
unsafe fn take_buffer(api: &Api, p: *mut c_char, len: usize) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller guarantees `len` readable bytes at `p`.
    let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
    let s = String::from_utf8_lossy(bytes).into_owned();
    // SAFETY: the buffer came from librados and is freed once.
    unsafe { (api.rados_buffer_free)(p) };
    s
}

/// A pool handle (`rados_ioctx_t`), with the connection it belongs to.
pub struct Pool {
    cluster: Arc<Cluster>,
    io: IoCtxT,
    name: String,
}

// SAFETY: librados I/O contexts may be used from several threads at once for the calls we make
// (image creation, opening, listing; librbd keeps its own copy for each open image).
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_ioctx_create; images opened from it hold an Arc of
        // this pool, so none is left.
        unsafe { (self.cluster.api.rados_ioctx_destroy)(self.io) };
    }
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub(super) fn api(&self) -> &'static Api {
        self.cluster.api
    }

    pub(super) fn raw(&self) -> IoCtxT {
        self.io
    }

    /// The pool's quota in bytes (0: none) and the bytes stored in it, from the monitors.
    pub fn quota(&self) -> Result<(u64, u64)> {
        let json = serde_json::json!({
            "prefix": "osd pool get-quota",
            "pool": self.name,
            "format": "json",
        });
        let out = self.cluster.mon_command(&json.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
            StorageError::InvalidInput(format!("Unexpected answer to osd pool get-quota: {e}"))
        })?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
        Ok((field("quota_max_bytes"), field("current_num_bytes")))
    }
}

/// Whether a path names a readable file, for clearer errors than librados gives.
pub fn check_file(path: &Path, what: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(StorageError::InvalidInput(format!(
            "The {what} {} is not a file",
            path.display()
        ))),
        Err(_) => Err(StorageError::NotFound(path.to_path_buf())),
    }
}
