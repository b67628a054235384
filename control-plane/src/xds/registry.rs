//! The registry of connected xDS streams behind `/status`.
//!
//! Each stream registers when admitted and is removed when its
//! [`Registration`] drops (the stream task ending, for whatever reason), so
//! the registry never lists a stream that is gone. Each entry has its own
//! lock, taken only for a few assignments, so streams do not contend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::status::{NackStatus, ProxyStatus};

/// Every connected stream, by registration order.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, Arc<Mutex<ProxyStatus>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Entries are plain values updated by single assignments: still
    // consistent if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Adds a stream; it is removed when the returned value drops.
    pub(crate) fn register(self: &Arc<Self>, status: ProxyStatus) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(status));
        lock(&self.streams).insert(id, Arc::clone(&status));
        Registration {
            registry: Arc::clone(self),
            id,
            status,
        }
    }

    /// A copy of every entry, oldest stream first.
    pub(crate) fn snapshot(&self) -> Vec<ProxyStatus> {
        let entries: Vec<_> = lock(&self.streams).values().cloned().collect();
        entries.iter().map(|entry| lock(entry).clone()).collect()
    }

    /// How many streams are connected.
    pub(crate) fn len(&self) -> usize {
        lock(&self.streams).len()
    }
}

/// One stream's entry; removed from the registry on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Arc<Registry>,
    id: u64,
    status: Arc<Mutex<ProxyStatus>>,
}

impl Registration {
    fn update(&self, type_url: &str, f: impl FnOnce(&mut crate::status::TypeStatus)) {
        let mut status = lock(&self.status);
        match status.types.get_mut(type_url) {
            Some(entry) => f(entry),
            None => {
                let mut entry = crate::status::TypeStatus::default();
                f(&mut entry);
                status.types.insert(type_url.to_owned(), entry);
            }
        }
    }

    pub(crate) fn sent(&self, type_url: &str, version: &str) {
        self.update(type_url, |t| set(&mut t.sent_version, version));
    }

    pub(crate) fn acked(&self, type_url: &str, version: &str) {
        self.update(type_url, |t| set(&mut t.acked_version, version));
    }

    pub(crate) fn nacked(&self, type_url: &str, version: &str, error: &str, at_unix: u64) {
        self.update(type_url, |t| {
            t.last_nack = Some(NackStatus {
                version: version.to_owned(),
                error: error.to_owned(),
                at_unix,
            });
        });
    }
}

/// Sets an optional string, reusing its allocation when possible.
fn set(slot: &mut Option<String>, value: &str) {
    match slot {
        Some(current) if current == value => {}
        Some(current) => {
            current.clear();
            current.push_str(value);
        }
        None => *slot = Some(value.to_owned()),
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.streams).remove(&self.id);
    }
}
