//! Networks: Linux bridges that VMs' NICs join, as Proxmox VE's `vmbr0`.
//!
//! A network is a name for a bridge, kept in `DATA/networks/NAME.json`. Creating one creates the
//! bridge (over rtnetlink, `strata_vmm::hostnet`), optionally VLAN-aware, and makes an uplink
//! interface its port; an existing bridge (the installer's `br0`) is adopted as it is. Removing a
//! network deletes the bridge only if Strata created it, and is refused while a VM definition
//! uses it. Bridges do not survive a host reboot unless the system configures them (the
//! installer writes `br0`'s configuration): a VM's start makes its network's bridge again when
//! it is missing ([`Service::ensure_network`]).
//!
//! A VM's NIC is a tap the supervisor opens (multi-queue, with virtio-net headers), makes a port
//! of the bridge (in VLAN `vlan` on a VLAN-aware bridge), and hands to the VMM process
//! ([`Service::open_nic`]); the tap goes away with the VMM.
//!
//! # Locking
//! | state | guarded by |
//! |---|---|
//! | definitions and bridges | one process-wide mutex for create, remove and ensure |

use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use strata_vmm::hostnet::{check_ifname, HostNetError, LinkFacts, Netlink};
use strata_vmm::net::tap::{open_queues_owned, TapQueue};

use super::{names, Service, ServiceError, ServiceResult};

static LOCK: Mutex<()> = Mutex::new(());

/// A request to create a network.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateNetwork {
    /// Name of the network.
    pub name: String,
    /// The bridge (created if missing, adopted if it exists).
    pub bridge: String,
    /// Make a new bridge VLAN-aware (NICs may then name a VLAN).
    #[serde(default)]
    pub vlan_aware: bool,
    /// An interface to make a port of the bridge (the physical uplink).
    #[serde(default)]
    pub uplink: Option<String>,
}

/// A network as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDefinition {
    /// Name of the network.
    pub name: String,
    /// The bridge.
    pub bridge: String,
    /// Whether the bridge is VLAN-aware.
    pub vlan_aware: bool,
    /// The uplink port, if any.
    pub uplink: Option<String>,
    /// Whether Strata created the bridge (and deletes it with the network).
    pub managed: bool,
}

/// A network and its bridge's state now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkInfo {
    /// The definition.
    pub definition: NetworkDefinition,
    /// Whether the bridge exists now.
    pub present: bool,
    /// Whether it is up.
    pub up: bool,
    /// Its ports now (uplink and taps).
    pub ports: Vec<String>,
}

fn net_err(e: HostNetError) -> ServiceError {
    match e {
        HostNetError::NoSuchLink(n) => ServiceError::NotFound(format!("Network interface {n}")),
        HostNetError::Kernel { op, err } => match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                ServiceError::Forbidden(format!("{op}: {err} (networks need root)"))
            }
            Some(libc::EOPNOTSUPP) => {
                ServiceError::Storage(strata_storage::StorageError::Unsupported(format!(
                    "{op}: the host's kernel does not support it ({err})"
                )))
            }
            Some(libc::EEXIST) | Some(libc::EBUSY) => {
                ServiceError::Conflict(format!("{op}: {err}"))
            }
            _ => ServiceError::internal(format!("{op}: {err}")),
        },
        other => ServiceError::internal(other.to_string()),
    }
}

fn bad(msg: String) -> ServiceError {
    ServiceError::BadRequest(msg)
}

impl Service {
    fn networks_dir(&self) -> PathBuf {
        self.data().root().join("networks")
    }

    fn network_path(&self, name: &str) -> ServiceResult<PathBuf> {
        names::validate("Network", name)?;
        Ok(self.networks_dir().join(format!("{name}.json")))
    }

    /// One network's definition (404 if there is none).
    pub fn network_definition(&self, name: &str) -> ServiceResult<NetworkDefinition> {
        let path = self.network_path(name)?;
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ServiceError::NotFound(format!("Network {name}")))
            }
            Err(e) => {
                return Err(ServiceError::internal(format!(
                    "Reading {}: {e}",
                    path.display()
                )))
            }
        };
        serde_json::from_slice(&text).map_err(|e| {
            ServiceError::internal(format!("The network {} is damaged: {e}", path.display()))
        })
    }

    fn network_names(&self) -> ServiceResult<Vec<String>> {
        let dir = self.networks_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ServiceError::internal(format!(
                    "Listing {}: {e}",
                    dir.display()
                )))
            }
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix(".json").map(str::to_string)
            })
            .filter(|n| names::validate("Network", n).is_ok())
            .collect();
        out.sort();
        Ok(out)
    }

    fn network_info(&self, def: NetworkDefinition, links: &[LinkFacts]) -> NetworkInfo {
        let bridge = links.iter().find(|l| l.name == def.bridge);
        let ports = bridge
            .map(|b| {
                links
                    .iter()
                    .filter(|l| l.controller == Some(b.index))
                    .map(|l| l.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        NetworkInfo {
            present: bridge.is_some(),
            up: bridge.is_some_and(|b| b.up),
            ports,
            definition: def,
        }
    }

    /// Every network with its bridge's state.
    pub fn list_networks(&self) -> ServiceResult<Vec<NetworkInfo>> {
        let links = Netlink::open()
            .and_then(|mut nl| nl.links())
            .map_err(net_err)?;
        let mut out = Vec::new();
        for name in self.network_names()? {
            match self.network_definition(&name) {
                Ok(def) => out.push(self.network_info(def, &links)),
                Err(ServiceError::NotFound(_)) => {}
                Err(e) => tracing::warn!(network = %name, error = %e, "skipping a network"),
            }
        }
        Ok(out)
    }

    /// One network with its bridge's state.
    pub fn get_network(&self, name: &str) -> ServiceResult<NetworkInfo> {
        let def = self.network_definition(name)?;
        let links = Netlink::open()
            .and_then(|mut nl| nl.links())
            .map_err(net_err)?;
        Ok(self.network_info(def, &links))
    }

    /// Creates a network: the bridge (or adopts an existing one), its uplink port, and the
    /// definition (409 if the name is taken or the bridge belongs to another network).
    pub fn create_network(&self, req: &CreateNetwork) -> ServiceResult<NetworkInfo> {
        names::validate("Network", &req.name)?;
        check_ifname(&req.bridge).map_err(bad)?;
        if let Some(u) = &req.uplink {
            check_ifname(u).map_err(bad)?;
            if u == &req.bridge {
                return Err(bad("The uplink cannot be the bridge itself".into()));
            }
        }
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.network_path(&req.name)?;
        if path.exists() {
            return Err(ServiceError::Conflict(format!(
                "Network {} exists already",
                req.name
            )));
        }
        for other in self.network_names()? {
            if let Ok(d) = self.network_definition(&other) {
                if d.bridge == req.bridge {
                    return Err(ServiceError::Conflict(format!(
                        "Bridge {} belongs to network {other} already",
                        req.bridge
                    )));
                }
            }
        }
        let mut nl = Netlink::open().map_err(net_err)?;
        let uplink = match &req.uplink {
            Some(u) => {
                let l = nl.require(u).map_err(net_err)?;
                if l.kind.as_deref() == Some("bridge") {
                    return Err(bad(format!("The uplink {u} is a bridge")));
                }
                Some(l)
            }
            None => None,
        };
        let (bridge, managed) = match nl.link(&req.bridge).map_err(net_err)? {
            Some(l) if l.kind.as_deref() != Some("bridge") => {
                return Err(ServiceError::Conflict(format!(
                    "{} exists and is not a bridge",
                    req.bridge
                )))
            }
            Some(_) if req.vlan_aware => {
                return Err(ServiceError::Conflict(format!(
                    "Bridge {} exists; an existing bridge is adopted as it is (without \
                     --vlan-aware)",
                    req.bridge
                )))
            }
            Some(l) => (l, false),
            None => (
                nl.create_bridge(&req.bridge, req.vlan_aware)
                    .map_err(net_err)?,
                true,
            ),
        };
        let def = NetworkDefinition {
            name: req.name.clone(),
            bridge: req.bridge.clone(),
            vlan_aware: req.vlan_aware,
            uplink: req.uplink.clone(),
            managed,
        };
        let result = (|| -> ServiceResult<()> {
            if let Some(u) = &uplink {
                nl.set_controller(
                    u.index,
                    Some(bridge.index),
                    &format!("Making {} a port of {}", u.name, bridge.name),
                )
                .map_err(net_err)?;
                nl.set_up(u.index, &u.name).map_err(net_err)?;
            }
            nl.set_up(bridge.index, &bridge.name).map_err(net_err)?;
            std::fs::create_dir_all(self.networks_dir()).map_err(|e| {
                ServiceError::internal(format!("Creating {}: {e}", self.networks_dir().display()))
            })?;
            let json = serde_json::to_vec_pretty(&def)
                .map_err(|e| ServiceError::internal(format!("Encoding a network: {e}")))?;
            if !super::vms::create_exclusively(&path, &json)? {
                return Err(ServiceError::Conflict(format!(
                    "Network {} exists already",
                    def.name
                )));
            }
            Ok(())
        })();
        if let Err(e) = result {
            if let Some(u) = &uplink {
                let _ = nl.set_controller(u.index, None, "Undoing the uplink");
            }
            if managed {
                let _ = nl.delete(bridge.index, &bridge.name);
            }
            return Err(e);
        }
        tracing::info!(network = %def.name, bridge = %def.bridge, managed, "network created");
        self.get_network(&def.name)
    }

    /// Removes a network no VM definition uses (409 otherwise); deletes its bridge if Strata
    /// created it (its uplink leaves the bridge first).
    pub fn remove_network(&self, name: &str) -> ServiceResult<()> {
        let def = self.network_definition(name)?;
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        for vm in self.list_vms()? {
            if vm.definition.nics.iter().any(|n| n.network == name) {
                return Err(ServiceError::Conflict(format!(
                    "Network {name} is used by VM {}",
                    vm.definition.name
                )));
            }
        }
        let mut nl = Netlink::open().map_err(net_err)?;
        if def.managed {
            if let Some(b) = nl.link(&def.bridge).map_err(net_err)? {
                if let Some(u) = def
                    .uplink
                    .as_deref()
                    .and_then(|u| nl.link(u).ok().flatten())
                {
                    let _ = nl.set_controller(u.index, None, "Taking the uplink off the bridge");
                }
                nl.delete(b.index, &b.name).map_err(net_err)?;
            }
        }
        let path = self.network_path(name)?;
        std::fs::remove_file(&path)
            .map_err(|e| ServiceError::internal(format!("Removing {}: {e}", path.display())))?;
        strata_storage::format::raw::sync_parent_dir(&path)?;
        tracing::info!(network = %name, "network removed");
        Ok(())
    }

    /// Makes sure network `name`'s bridge exists and is up (made again after a host reboot),
    /// with its uplink as a port. Returns the definition and the bridge.
    pub fn ensure_network(&self, name: &str) -> ServiceResult<(NetworkDefinition, LinkFacts)> {
        let def = self.network_definition(name)?;
        let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let mut nl = Netlink::open().map_err(net_err)?;
        let bridge = match nl.link(&def.bridge).map_err(net_err)? {
            Some(b) if b.kind.as_deref() == Some("bridge") => b,
            Some(_) => {
                return Err(ServiceError::Conflict(format!(
                    "{} of network {name} is not a bridge",
                    def.bridge
                )))
            }
            None if def.managed => {
                let b = nl
                    .create_bridge(&def.bridge, def.vlan_aware)
                    .map_err(net_err)?;
                if let Some(u) = def.uplink.as_deref() {
                    let l = nl.require(u).map_err(net_err)?;
                    nl.set_controller(l.index, Some(b.index), "Making the uplink a port")
                        .map_err(net_err)?;
                    nl.set_up(l.index, u).map_err(net_err)?;
                }
                b
            }
            None => {
                return Err(ServiceError::NotFound(format!(
                    "The bridge {} of network {name}",
                    def.bridge
                )))
            }
        };
        if !bridge.up {
            nl.set_up(bridge.index, &bridge.name).map_err(net_err)?;
        }
        Ok((def, bridge))
    }

    /// Opens tap `tap` with `queues` queues as a port of network `network`'s bridge (in VLAN
    /// `vlan` when given, which needs a VLAN-aware network) and brings it up; `owner` (the
    /// VMM's uid) becomes the tap's owner. The tap lives as long as its descriptors.
    pub fn open_nic(
        &self,
        network: &str,
        tap: &str,
        queues: usize,
        vlan: Option<u16>,
        owner: Option<u32>,
    ) -> ServiceResult<Vec<TapQueue>> {
        let (def, bridge) = self.ensure_network(network)?;
        if vlan.is_some() && !def.vlan_aware {
            return Err(bad(format!(
                "Network {network} is not VLAN-aware; a NIC on it cannot name a VLAN"
            )));
        }
        let queues = open_queues_owned(tap, queues, owner).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => ServiceError::Conflict(format!("Tap {tap} is in use: {e}")),
            Some(libc::EPERM) => ServiceError::Forbidden(format!("{e} (taps need root)")),
            _ => ServiceError::internal(e.to_string()),
        })?;
        let mut nl = Netlink::open().map_err(net_err)?;
        let link = nl.require(tap).map_err(net_err)?;
        nl.set_controller(
            link.index,
            Some(bridge.index),
            &format!("Making {tap} a port of {}", bridge.name),
        )
        .map_err(net_err)?;
        if let Some(v) = vlan {
            nl.set_port_vlan(link.index, v, tap).map_err(net_err)?;
        }
        nl.set_up(link.index, tap).map_err(net_err)?;
        Ok(queues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DataDir;

    /// Runs `f` with a fresh service on a thread in a fresh network namespace (root only).
    fn in_netns(f: impl FnOnce(&Service) + Send + 'static) {
        if !strata_vmm::sandbox::jail::is_root() {
            // Fails under CI=1, where the tests run as root.
            strata_testkit::partial_skip("network tests need root");
            return;
        }
        std::thread::spawn(move || {
            // SAFETY: unshare(2) of this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let dir = tempfile::tempdir().unwrap();
            let svc = Service::open(DataDir::at(dir.path().join("data"))).unwrap();
            f(&svc);
        })
        .join()
        .unwrap();
    }

    fn req(name: &str, bridge: &str) -> CreateNetwork {
        CreateNetwork {
            name: name.into(),
            bridge: bridge.into(),
            vlan_aware: false,
            uplink: None,
        }
    }

    #[test]
    fn networks_create_list_ensure_and_remove_their_bridges() {
        in_netns(|svc| {
            let mut nl = Netlink::open().unwrap();
            let info = svc.create_network(&req("lan", "stbr0")).unwrap();
            assert!(info.present && info.up && info.definition.managed);
            assert_eq!(
                svc.create_network(&req("lan", "stbr1"))
                    .unwrap_err()
                    .status(),
                409
            );
            assert_eq!(
                svc.create_network(&req("lan2", "stbr0"))
                    .unwrap_err()
                    .status(),
                409
            );
            assert_eq!(
                svc.create_network(&req("../x", "b")).unwrap_err().status(),
                400
            );
            assert_eq!(
                svc.create_network(&req("x", "bad/name"))
                    .unwrap_err()
                    .status(),
                400
            );
            let missing_uplink = CreateNetwork {
                uplink: Some("nosuch0".into()),
                ..req("wan", "stbr9")
            };
            assert_eq!(
                svc.create_network(&missing_uplink).unwrap_err().status(),
                404
            );
            assert!(nl.link("stbr9").unwrap().is_none(), "nothing left behind");
            // A tap on it is a port.
            let taps = svc.open_nic("lan", "sttap0", 2, None, Some(4242)).unwrap();
            assert_eq!(taps.len(), 2);
            assert_eq!(
                svc.get_network("lan").unwrap().ports,
                vec!["sttap0".to_string()]
            );
            assert_eq!(
                svc.open_nic("lan", "sttap1", 1, Some(5), None)
                    .unwrap_err()
                    .status(),
                400
            );
            drop(taps);
            // The bridge goes (a host reboot) and comes back when a NIC needs it.
            let b = nl.require("stbr0").unwrap();
            nl.delete(b.index, "stbr0").unwrap();
            assert!(!svc.get_network("lan").unwrap().present);
            let _taps = svc.open_nic("lan", "sttap0", 1, None, None).unwrap();
            assert!(svc.get_network("lan").unwrap().present);
            // An existing bridge is adopted, and stays when the network goes.
            nl.create_bridge("vmbr0", false).unwrap();
            let adopted = svc.create_network(&req("mgmt", "vmbr0")).unwrap();
            assert!(!adopted.definition.managed);
            assert_eq!(svc.list_networks().unwrap().len(), 2);
            svc.remove_network("mgmt").unwrap();
            assert!(nl.link("vmbr0").unwrap().is_some());
            svc.remove_network("lan").unwrap();
            assert!(nl.link("stbr0").unwrap().is_none());
            assert_eq!(svc.remove_network("lan").unwrap_err().status(), 404);
        });
    }
}
