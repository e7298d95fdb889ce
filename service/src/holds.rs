//! Who holds a volume: running VMs, jobs and downloads that have it open.
//!
//! Opening a volume through the service ([`super::Service::resolve_source`]) takes a [`Hold`]
//! on it, released when the opened volume is dropped. A held volume may not be resized or
//! removed (409, naming the holders), so a job converting onto a volume or a VM writing to it
//! never sees its device change size or vanish underneath.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{ServiceError, ServiceResult};

/// The holds of one server.
#[derive(Debug, Default)]
pub struct Holds {
    table: Mutex<BTreeMap<String, BTreeMap<u64, String>>>,
    next: AtomicU64,
}

/// One hold on a volume; dropping it releases the hold.
#[derive(Debug)]
pub struct Hold {
    holds: Arc<Holds>,
    key: String,
    id: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut table = self.holds.lock();
        if let Some(h) = table.get_mut(&self.key) {
            h.remove(&self.id);
            if h.is_empty() {
                table.remove(&self.key);
            }
        }
    }
}

impl Holds {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, BTreeMap<u64, String>>> {
        // The table is a plain map updated in single steps: it is whole even after a panic.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a hold on volume `key` (`VG/NAME`) for `holder` (described for people).
    pub fn take(self: &Arc<Self>, key: &str, holder: &str) -> Hold {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(key.to_string())
            .or_default()
            .insert(id, holder.to_string());
        Hold {
            holds: self.clone(),
            key: key.to_string(),
            id,
        }
    }

    /// Who holds `key` now.
    pub fn holders(&self, key: &str) -> Vec<String> {
        self.lock()
            .get(key)
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Runs `f` unless `key` is held (409 naming the holders). No new hold can be taken while
    /// `f` runs.
    pub fn unless_held<T>(
        &self,
        key: &str,
        action: &str,
        f: impl FnOnce() -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let table = self.lock();
        if let Some(h) = table.get(key).filter(|h| !h.is_empty()) {
            let mut who: Vec<&str> = h.values().map(String::as_str).collect();
            who.dedup();
            return Err(ServiceError::Conflict(format!(
                "Cannot {action} volume {key}: it is in use by {}",
                who.join(", ")
            )));
        }
        let out = f();
        drop(table);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_refuse_until_released() {
        let holds = Arc::new(Holds::default());
        let a = holds.take("vg/x", "VM web");
        let b = holds.take("vg/x", "job job-1 (convert)");
        let e = holds.unless_held("vg/x", "resize", || Ok(())).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(e.to_string().contains("VM web"), "{e}");
        assert_eq!(holds.holders("vg/x").len(), 2);
        drop(a);
        assert!(holds.unless_held("vg/x", "resize", || Ok(())).is_err());
        drop(b);
        assert!(holds.unless_held("vg/x", "resize", || Ok(())).is_ok());
        assert!(holds.holders("vg/x").is_empty());
        assert!(holds.unless_held("vg/y", "remove", || Ok(1)).is_ok());
    }
}
