//! Exports and the registry a server serves them from.
//!
//! An [`Export`] is a block device under a name, with its access rule and the dirty bitmaps it
//! exposes as `qemu:dirty-bitmap:NAME` contexts. The [`ExportRegistry`] is shared between the
//! server's connections and whoever manages exports (`strata nbd serve` now, `strata serve`
//! later): exports can be added and removed while the server runs, and the registry says which
//! clients are connected to what. Removing an export disconnects its clients; the device is
//! released when the last connection to it has finished its requests.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use strata_storage::bitmap::BitmapSet;
use strata_storage::BlockDevice;

use crate::error::{NbdError, Result};
use crate::proto::MAX_STRING;
use crate::tls::Fingerprint;

/// Shortest name accepted for an export whose access rule is [`Access::SecretName`].
pub const MIN_SECRET_NAME: usize = 22;

/// Who may use an export (besides the transport rule: plain NBD only over loopback or a Unix
/// socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Every client that reaches the server.
    Open,
    /// Only TLS clients presenting one of these certificates (SHA-256 of the DER encoding),
    /// which must also chain to the server's client CA.
    ClientCertificates(BTreeSet<Fingerprint>),
    /// Only clients that know the export's name, which is a secret: it is never listed and must
    /// be at least [`MIN_SECRET_NAME`] characters long.
    SecretName,
}

impl Access {
    /// A short description for listings (no secrets).
    pub fn describe(&self) -> String {
        match self {
            Access::Open => "open".into(),
            Access::ClientCertificates(c) => format!("{} client certificate(s)", c.len()),
            Access::SecretName => "secret name".into(),
        }
    }
}

/// What to export.
pub struct ExportConfig {
    /// The export's name as clients ask for it (1–4096 bytes of UTF-8, no NUL).
    pub name: String,
    /// What is exported, for people and for holds (`lv:strata/vm1`, an image path, a backup).
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse writes even if the device takes them.
    pub read_only: bool,
    /// Dirty bitmaps exposed as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Option<Arc<BitmapSet>>,
    /// Who may connect.
    pub access: Access,
    /// Whatever keeps the device usable (an open volume group, an image lock), released with
    /// the export.
    pub keep_alive: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportConfig")
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .field("access", &self.access.describe())
            .finish()
    }
}

/// A connected client, as listings show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientInfo {
    /// Connection number (unique per server run).
    pub id: u64,
    /// The peer (`IP:PORT`, or `unix`).
    pub peer: String,
    /// Whether the connection uses TLS.
    pub tls: bool,
    /// SHA-256 of the client's certificate, if it presented one.
    pub certificate: Option<Fingerprint>,
    /// When transmission started.
    pub since: SystemTime,
}

/// An export, as listings show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name (a secret name is shown as `None`).
    pub name: Option<String>,
    /// What is exported.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are refused.
    pub read_only: bool,
    /// The access rule, described.
    pub access: String,
    /// Bitmaps exposed.
    pub bitmaps: Vec<String>,
    /// Connected clients.
    pub clients: Vec<ClientInfo>,
}

/// Something that ends a connection from outside its thread (shuts its socket down).
pub(crate) trait Disconnect: Send + Sync {
    fn disconnect(&self);
}

struct Client {
    info: ClientInfo,
    disconnect: Box<dyn Disconnect>,
}

/// An export being served. See the module documentation.
pub struct Export {
    name: String,
    description: String,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    bitmaps: Option<Arc<BitmapSet>>,
    access: Access,
    removed: AtomicBool,
    clients: Mutex<HashMap<u64, Client>>,
    gone: Condvar,
    _keep_alive: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("description", &self.description)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Export {
    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What is exported.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only || self.device.read_only()
    }

    /// The bitmaps exposed.
    pub fn bitmaps(&self) -> Option<&Arc<BitmapSet>> {
        self.bitmaps.as_ref()
    }

    /// Names of the bitmaps exposed now.
    pub fn bitmap_names(&self) -> Vec<String> {
        self.bitmaps
            .as_ref()
            .map(|b| b.infos().into_iter().map(|i| i.name).collect())
            .unwrap_or_default()
    }

    /// The access rule.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// Whether a client on a session with these properties may use the export.
    pub(crate) fn admits(&self, tls: bool, certificate: Option<&Fingerprint>) -> bool {
        match &self.access {
            Access::Open | Access::SecretName => true,
            Access::ClientCertificates(allowed) => {
                tls && certificate.is_some_and(|c| allowed.contains(c))
            }
        }
    }

    /// Whether the export may appear in `NBD_OPT_LIST` for this client.
    pub(crate) fn listed_for(&self, tls: bool, certificate: Option<&Fingerprint>) -> bool {
        !matches!(self.access, Access::SecretName) && self.admits(tls, certificate)
    }

    /// Whether the export was removed (its connections are ending).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    fn lock_clients(&self) -> MutexGuard<'_, HashMap<u64, Client>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection in transmission; refused once the export is removed.
    pub(crate) fn attach(&self, info: ClientInfo, disconnect: Box<dyn Disconnect>) -> bool {
        let mut clients = self.lock_clients();
        if self.is_removed() {
            return false;
        }
        clients.insert(info.id, Client { info, disconnect });
        true
    }

    /// Unregisters a connection that has finished.
    pub(crate) fn detach(&self, id: u64) {
        self.lock_clients().remove(&id);
        self.gone.notify_all();
    }

    /// The export as listings show it.
    pub fn info(&self) -> ExportInfo {
        let mut clients: Vec<ClientInfo> = self
            .lock_clients()
            .values()
            .map(|c| c.info.clone())
            .collect();
        clients.sort_by_key(|c| c.id);
        ExportInfo {
            name: (!matches!(self.access, Access::SecretName)).then(|| self.name.clone()),
            description: self.description.clone(),
            size: self.device.size(),
            read_only: self.read_only(),
            access: self.access.describe(),
            bitmaps: self.bitmap_names(),
            clients,
        }
    }

    fn disconnect_all(&self) {
        self.removed.store(true, Ordering::Release);
        for c in self.lock_clients().values() {
            c.disconnect.disconnect();
        }
    }

    /// Waits until no connection uses the export, at most `timeout`; whether none does.
    pub fn wait_unused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut clients = self.lock_clients();
        while !clients.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            clients = self
                .gone
                .wait_timeout(clients, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Checks an export name: 1–4096 bytes, no NUL or other control characters.
pub fn check_export_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_STRING || name.chars().any(|c| c.is_control()) {
        return Err(NbdError::InvalidConfig(format!(
            "Export name {:?}: 1 to {MAX_STRING} bytes without control characters",
            crate::proto::truncate(name, 80)
        )));
    }
    Ok(())
}

/// The exports a server offers. See the module documentation.
#[derive(Debug, Default)]
pub struct ExportRegistry {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    default: RwLock<Option<String>>,
    next_client: AtomicU64,
}

impl ExportRegistry {
    /// An empty registry.
    pub fn new() -> Arc<ExportRegistry> {
        Arc::new(ExportRegistry::default())
    }

    /// Adds an export; a name in use is refused.
    pub fn add(&self, config: ExportConfig) -> Result<Arc<Export>> {
        check_export_name(&config.name)?;
        if config.access == Access::SecretName && config.name.chars().count() < MIN_SECRET_NAME {
            return Err(NbdError::InvalidConfig(format!(
                "A secret export name must have at least {MIN_SECRET_NAME} characters"
            )));
        }
        if let Access::ClientCertificates(c) = &config.access {
            if c.is_empty() {
                return Err(NbdError::InvalidConfig(
                    "A client-certificate allow-list must name at least one certificate".into(),
                ));
            }
        }
        let mut map = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&config.name) {
            return Err(NbdError::ExportExists(config.name));
        }
        let export = Arc::new(Export {
            name: config.name.clone(),
            description: config.description,
            device: config.device,
            read_only: config.read_only,
            bitmaps: config.bitmaps,
            access: config.access,
            removed: AtomicBool::new(false),
            clients: Mutex::new(HashMap::new()),
            gone: Condvar::new(),
            _keep_alive: config.keep_alive,
        });
        map.insert(config.name, export.clone());
        Ok(export)
    }

    /// Removes an export and disconnects its clients. The returned export can be waited on
    /// ([`Export::wait_unused`]) until its device is no longer used.
    pub fn remove(&self, name: &str) -> Result<Arc<Export>> {
        let export = self
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| NbdError::NoSuchExport(name.to_string()))?;
        let mut default = self.default.write().unwrap_or_else(|p| p.into_inner());
        if default.as_deref() == Some(name) {
            *default = None;
        }
        export.disconnect_all();
        Ok(export)
    }

    /// Removes every export (server shutdown).
    pub fn clear(&self) -> Vec<Arc<Export>> {
        let names: Vec<String> = self.read().keys().cloned().collect();
        names.iter().filter_map(|n| self.remove(n).ok()).collect()
    }

    /// Names the export that clients asking for the empty name get (`nbd://host:port`).
    pub fn set_default(&self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            let map = self.read();
            let e = map
                .get(n)
                .ok_or_else(|| NbdError::NoSuchExport(n.to_string()))?;
            if e.access == Access::SecretName {
                return Err(NbdError::InvalidConfig(
                    "An export with a secret name cannot be the default export".into(),
                ));
            }
        }
        *self.default.write().unwrap_or_else(|p| p.into_inner()) = name.map(str::to_string);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The export a client asks for by `name` (the empty name means the default export).
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.read();
        if name.is_empty() {
            let default = self.default.read().unwrap_or_else(|p| p.into_inner());
            return default.as_ref().and_then(|d| map.get(d)).cloned();
        }
        map.get(name).cloned()
    }

    /// Every export, for `NBD_OPT_LIST` filtering.
    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        self.read().values().cloned().collect()
    }

    /// The exports and who is connected to each.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.read().values().map(|e| e.info()).collect()
    }

    /// The exports whose description is `description` (who holds a volume or image).
    pub fn holders_of(&self, description: &str) -> Vec<ExportInfo> {
        self.read()
            .values()
            .filter(|e| e.description == description)
            .map(|e| e.info())
            .collect()
    }

    /// Whether an export restricts access by client certificate.
    pub fn has_certificate_exports(&self) -> bool {
        self.read()
            .values()
            .any(|e| matches!(e.access, Access::ClientCertificates(_)))
    }

    /// A new connection number.
    pub(crate) fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::io::memory::MemoryDevice;

    fn config(name: &str, access: Access) -> ExportConfig {
        ExportConfig {
            name: name.into(),
            description: "memory".into(),
            device: MemoryDevice::new(1 << 20),
            read_only: false,
            bitmaps: None,
            access,
            keep_alive: None,
        }
    }

    struct Flag(Arc<AtomicBool>);
    impl Disconnect for Flag {
        fn disconnect(&self) {
            self.0.store(true, Ordering::Release);
        }
    }

    #[test]
    fn names_are_unique_checked_and_removal_disconnects() {
        let r = ExportRegistry::new();
        r.add(config("a", Access::Open)).unwrap();
        assert!(matches!(
            r.add(config("a", Access::Open)),
            Err(NbdError::ExportExists(_))
        ));
        assert!(r.add(config("", Access::Open)).is_err());
        assert!(r.add(config("x\0y", Access::Open)).is_err());
        assert!(r.add(config("short", Access::SecretName)).is_err());
        assert!(r
            .add(config("a", Access::ClientCertificates(BTreeSet::new())))
            .is_err());
        r.add(config("0123456789abcdefghijklmnop", Access::SecretName))
            .unwrap();
        assert!(r.set_default(Some("0123456789abcdefghijklmnop")).is_err());
        r.set_default(Some("a")).unwrap();
        let e = r.lookup("").unwrap();
        assert_eq!(e.name(), "a");
        let listed: Vec<_> = r.list().into_iter().map(|i| i.name).collect();
        assert_eq!(listed, vec![None, Some("a".to_string())]);

        let hit = Arc::new(AtomicBool::new(false));
        let info = ClientInfo {
            id: 1,
            peer: "unix".into(),
            tls: false,
            certificate: None,
            since: SystemTime::now(),
        };
        assert!(e.attach(info.clone(), Box::new(Flag(hit.clone()))));
        assert_eq!(r.holders_of("memory").len(), 2);
        let removed = r.remove("a").unwrap();
        assert!(hit.load(Ordering::Acquire));
        assert!(r.lookup("").is_none() && r.lookup("a").is_none());
        assert!(!removed.wait_unused(Duration::from_millis(10)));
        assert!(!removed.attach(info, Box::new(Flag(hit))));
        removed.detach(1);
        assert!(removed.wait_unused(Duration::from_millis(10)));
    }

    #[test]
    fn certificate_lists_admit_only_tls_clients_presenting_a_listed_certificate() {
        let fp = Fingerprint([7; 32]);
        let r = ExportRegistry::new();
        let e = r
            .add(config(
                "c",
                Access::ClientCertificates([fp].into_iter().collect()),
            ))
            .unwrap();
        assert!(e.admits(true, Some(&fp)));
        assert!(!e.admits(false, Some(&fp)));
        assert!(!e.admits(true, Some(&Fingerprint([8; 32]))));
        assert!(!e.admits(true, None));
        assert!(!e.listed_for(true, None));
    }
}
