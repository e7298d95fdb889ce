//! RBD images: creating, cloning, listing and removing them in a pool, and an open image handle
//! (`rbd_image_t`) with its snapshots, parent, children and changed extents.

use std::ffi::{c_int, c_void, CString};
use std::sync::Arc;

use super::cluster::Pool;
use super::ffi::{
    self, check, cstr, string, ImageInfo, ImageT, LinkedImageSpec, SnapInfo, SnapSpec,
};
use crate::error::{Result, StorageError};

/// The features Strata's images get: layering (clones), exclusive-lock (one writer at a time,
/// handed over cooperatively), object-map and fast-diff (changed-block tracking without reading).
pub const FEATURES: u64 = ffi::FEATURE_LAYERING
    | ffi::FEATURE_EXCLUSIVE_LOCK
    | ffi::FEATURE_OBJECT_MAP
    | ffi::FEATURE_FAST_DIFF;

/// Image options for new images and clones: format 2, [`FEATURES`], and for clones format 2.
struct Options {
    api: &'static ffi::Api,
    raw: ffi::ImageOptionsT,
}

impl Options {
    fn new(pool: &Pool, clone: bool) -> Result<Options> {
        let api = pool.api();
        let mut raw: ffi::ImageOptionsT = std::ptr::null_mut();
        // SAFETY: a valid out-pointer; the options are destroyed in Drop.
        unsafe { (api.rbd_image_options_create)(&mut raw) };
        let o = Options { api, raw };
        let mut opts = vec![(ffi::OPTION_FORMAT, 2), (ffi::OPTION_FEATURES, FEATURES)];
        if clone {
            opts.push((ffi::OPTION_CLONE_FORMAT, 2));
        }
        for (opt, value) in opts {
            // SAFETY: valid options handle; the option numbers are uint64 options.
            let r = unsafe { (api.rbd_image_options_set_uint64)(o.raw, opt, value) };
            check(r, || format!("Setting RBD image option {opt}"))?;
        }
        Ok(o)
    }
}

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { (self.api.rbd_image_options_destroy)(self.raw) };
    }
}

fn label(pool: &Pool, name: &str) -> String {
    format!("RBD image {}/{name}", pool.name())
}

/// Creates image `name` of `size` bytes (format 2, [`FEATURES`]).
pub fn create(pool: &Pool, name: &str, size: u64) -> Result<()> {
    let o = Options::new(pool, false)?;
    let n = cstr(name)?;
    // SAFETY: valid pool and options handles, NUL-terminated name.
    let r = unsafe { (pool.api().rbd_create4)(pool.raw(), n.as_ptr(), size, o.raw) };
    check(r, || format!("Creating {}", label(pool, name))).map(|_| ())
}

/// Makes `child` a clone (format 2) of snapshot `snap` of image `parent`.
pub fn clone(pool: &Pool, parent: &str, snap: &str, child: &str) -> Result<()> {
    let o = Options::new(pool, true)?;
    let (p, s, c) = (cstr(parent)?, cstr(snap)?, cstr(child)?);
    // SAFETY: valid pool and options handles, NUL-terminated names.
    let r = unsafe {
        (pool.api().rbd_clone3)(
            pool.raw(),
            p.as_ptr(),
            s.as_ptr(),
            pool.raw(),
            c.as_ptr(),
            o.raw,
        )
    };
    check(r, || {
        format!("Cloning {}@{snap} as {child}", label(pool, parent))
    })
    .map(|_| ())
}

/// Removes image `name` (librbd refuses while it has snapshots or watchers).
pub fn remove(pool: &Pool, name: &str) -> Result<()> {
    let n = cstr(name)?;
    // SAFETY: valid pool handle, NUL-terminated name.
    let r = unsafe { (pool.api().rbd_remove)(pool.raw(), n.as_ptr()) };
    check(r, || format!("Removing {}", label(pool, name))).map(|_| ())
}

/// Renames image `old` to `new`.
pub fn rename(pool: &Pool, old: &str, new: &str) -> Result<()> {
    let (o, n) = (cstr(old)?, cstr(new)?);
    // SAFETY: valid pool handle, NUL-terminated names.
    let r = unsafe { (pool.api().rbd_rename)(pool.raw(), o.as_ptr(), n.as_ptr()) };
    check(r, || format!("Renaming {} to {new}", label(pool, old))).map(|_| ())
}

/// Most entries a listing call is asked for; librbd says how many it needs beyond that.
const MAX_LIST: usize = 1 << 20;

/// Names of every image in the pool.
pub fn list(pool: &Pool) -> Result<Vec<String>> {
    let api = pool.api();
    let mut cap = 64usize;
    loop {
        let mut specs: Vec<ffi::ImageSpec> = (0..cap)
            .map(|_| ffi::ImageSpec {
                id: std::ptr::null_mut(),
                name: std::ptr::null_mut(),
            })
            .collect();
        let mut n = cap;
        // SAFETY: `specs` has room for `n` entries; librbd fills at most that many and says
        // how many it needs with -ERANGE.
        let r = unsafe { (api.rbd_list2)(pool.raw(), specs.as_mut_ptr(), &mut n) };
        if r == -libc::ERANGE && n > cap && n <= MAX_LIST {
            cap = n;
            continue;
        }
        check(r, || format!("Listing the images of pool {}", pool.name()))?;
        let names = specs[..n.min(cap)]
            .iter()
            // SAFETY: librbd filled these entries with valid strings.
            .map(|s| unsafe { string(s.name) })
            .collect();
        // SAFETY: frees the strings librbd allocated in the first `n` entries.
        unsafe { (api.rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), n.min(cap)) };
        return Ok(names);
    }
}

/// A snapshot of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Snapshot id (increasing with creation).
    pub id: u64,
    /// Name.
    pub name: String,
    /// Image size when it was taken.
    pub size: u64,
}

/// An open image. Thread-safe for I/O; snapshot selection ([`Image::set_snap`]) is only used on
/// handles that no data path shares.
pub struct Image {
    pool: Arc<Pool>,
    raw: ImageT,
    name: String,
}

// SAFETY: librbd image handles may be used from several threads at once for I/O and queries
// (librbd serialises internally).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}/{})", self.pool.name(), self.name)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle came from rbd_open and is closed once; every queue on it was
        // drained before its last Arc went (queues hold an Arc of the image).
        let r = unsafe { (self.pool.api().rbd_close)(self.raw) };
        if r < 0 {
            tracing::warn!(image = %self.name, errno = -r, "closing an RBD image failed");
        }
    }
}

/// Calls `f` for each extent `rbd_diff_iterate2` reports; `f` returns false to stop early.
struct DiffSink<'a> {
    f: &'a mut dyn FnMut(u64, u64, bool) -> bool,
    stopped: bool,
}

/// The value a callback returns to stop the iteration (reported back as this errno).
const STOP: c_int = -libc::ECANCELED;

unsafe extern "C" fn diff_callback(
    offset: u64,
    len: usize,
    exists: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: `arg` is the `DiffSink` that `Image::diff` passed, alive for the whole iteration.
    let sink = unsafe { &mut *(arg as *mut DiffSink<'_>) };
    let go = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (sink.f)(offset, len as u64, exists != 0)
    }));
    match go {
        Ok(true) => 0,
        Ok(false) => {
            sink.stopped = true;
            STOP
        }
        Err(_) => -libc::EIO,
    }
}

impl Image {
    /// Opens image `name` of `pool`, at snapshot `snap` if given (read-only then).
    pub fn open(
        pool: &Arc<Pool>,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
    ) -> Result<Image> {
        let api = pool.api();
        let n = cstr(name)?;
        let s: Option<CString> = snap.map(cstr).transpose()?;
        let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut raw: ImageT = std::ptr::null_mut();
        let open = if read_only || snap.is_some() {
            api.rbd_open_read_only
        } else {
            api.rbd_open
        };
        // SAFETY: valid pool handle, NUL-terminated names (or NULL for no snapshot), valid
        // out-pointer.
        let r = unsafe { open(pool.raw(), n.as_ptr(), &mut raw, sp) };
        check(r, || match snap {
            Some(s) => format!("{}@{s}", label(pool, name)),
            None => label(pool, name),
        })?;
        Ok(Image {
            pool: pool.clone(),
            raw,
            name: name.to_string(),
        })
    }

    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub(super) fn raw(&self) -> ImageT {
        self.raw
    }

    pub(super) fn api(&self) -> &'static ffi::Api {
        self.pool.api()
    }

    fn what(&self) -> String {
        label(&self.pool, &self.name)
    }

    /// Current size in bytes (of the selected snapshot, if any).
    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: valid image handle and out-pointer.
        let r = unsafe { (self.api().rbd_get_size)(self.raw, &mut size) };
        check(r, || format!("Size of {}", self.what()))?;
        Ok(size)
    }

    /// Size, object size and object count.
    pub fn stat(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::default();
        // SAFETY: valid image handle; `info` is a correctly laid out rbd_image_info_t.
        let r =
            unsafe { (self.api().rbd_stat)(self.raw, &mut info, std::mem::size_of::<ImageInfo>()) };
        check(r, || format!("Stat of {}", self.what()))?;
        Ok(info)
    }

    /// The image's feature bits.
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: valid image handle and out-pointer.
        let r = unsafe { (self.api().rbd_get_features)(self.raw, &mut f) };
        check(r, || format!("Features of {}", self.what()))?;
        Ok(f)
    }

    /// Changes the size (shrinking discards what is cut off).
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: valid image handle; no progress callback.
        let r =
            unsafe { (self.api().rbd_resize2)(self.raw, size, true, None, std::ptr::null_mut()) };
        check(r, || format!("Resizing {} to {size} bytes", self.what())).map(|_| ())
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: valid image handle.
        let r = unsafe { (self.api().rbd_flush)(self.raw) };
        check(r, || format!("Flushing {}", self.what())).map(|_| ())
    }

    /// The image's snapshots (user snapshots), oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let api = self.api();
        let mut cap: c_int = 16;
        loop {
            let mut snaps: Vec<SnapInfo> = (0..cap)
                .map(|_| SnapInfo {
                    id: 0,
                    size: 0,
                    name: std::ptr::null(),
                })
                .collect();
            let mut n = cap;
            // SAFETY: `snaps` has room for `n` entries (the last for the terminator).
            let r = unsafe { (api.rbd_snap_list)(self.raw, snaps.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE && n > cap && (n as usize) <= MAX_LIST {
                cap = n;
                continue;
            }
            let count = check(r, || format!("Listing the snapshots of {}", self.what()))?;
            let mut out: Vec<Snapshot> = snaps[..(count as usize).min(snaps.len())]
                .iter()
                .map(|s| Snapshot {
                    id: s.id,
                    // SAFETY: librbd filled the first `count` entries with valid names.
                    name: unsafe { string(s.name) },
                    size: s.size,
                })
                .collect();
            // SAFETY: frees the names librbd allocated, up to its terminating entry.
            unsafe { (api.rbd_snap_list_end)(snaps.as_mut_ptr()) };
            out.sort_by_key(|s| s.id);
            return Ok(out);
        }
    }

    fn snap_call(
        &self,
        f: unsafe extern "C" fn(ImageT, *const std::ffi::c_char) -> c_int,
        snap: &str,
        what: &str,
    ) -> Result<()> {
        let s = cstr(snap)?;
        // SAFETY: valid image handle and NUL-terminated snapshot name.
        let r = unsafe { f(self.raw, s.as_ptr()) };
        check(r, || format!("{what} snapshot {}@{snap}", self.what())).map(|_| ())
    }

    /// Takes snapshot `snap`.
    pub fn snap_create(&self, snap: &str) -> Result<()> {
        self.snap_call(self.api().rbd_snap_create, snap, "Taking")
    }

    /// Removes snapshot `snap`.
    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        self.snap_call(self.api().rbd_snap_remove, snap, "Removing")
    }

    /// Protects snapshot `snap` from removal.
    pub fn snap_protect(&self, snap: &str) -> Result<()> {
        self.snap_call(self.api().rbd_snap_protect, snap, "Protecting")
    }

    /// Lifts the protection of snapshot `snap`.
    pub fn snap_unprotect(&self, snap: &str) -> Result<()> {
        self.snap_call(self.api().rbd_snap_unprotect, snap, "Unprotecting")
    }

    /// Renames snapshot `old` to `new`.
    pub fn snap_rename(&self, old: &str, new: &str) -> Result<()> {
        let (o, n) = (cstr(old)?, cstr(new)?);
        // SAFETY: valid image handle and NUL-terminated names.
        let r = unsafe { (self.api().rbd_snap_rename)(self.raw, o.as_ptr(), n.as_ptr()) };
        check(r, || {
            format!("Renaming snapshot {}@{old} to {new}", self.what())
        })
        .map(|_| ())
    }

    /// Whether snapshot `snap` is protected.
    pub fn snap_is_protected(&self, snap: &str) -> Result<bool> {
        let s = cstr(snap)?;
        let mut p: c_int = 0;
        // SAFETY: valid image handle, NUL-terminated name, valid out-pointer.
        let r = unsafe { (self.api().rbd_snap_is_protected)(self.raw, s.as_ptr(), &mut p) };
        check(r, || format!("Snapshot {}@{snap}", self.what()))?;
        Ok(p != 0)
    }

    /// Selects snapshot `snap` (or the writable head with `None`) for reads and for
    /// [`Image::children`]. Only for handles no queue uses.
    pub fn set_snap(&self, snap: Option<&str>) -> Result<()> {
        let s: Option<CString> = snap.map(cstr).transpose()?;
        let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: valid image handle; NULL selects the head.
        let r = unsafe { (self.api().rbd_snap_set)(self.raw, sp) };
        check(r, || {
            format!("Selecting snapshot {snap:?} of {}", self.what())
        })
        .map(|_| ())
    }

    /// Images cloned from the selected snapshot, as `pool/image` (trash entries included).
    pub fn children(&self) -> Result<Vec<String>> {
        let api = self.api();
        let mut cap = 16usize;
        loop {
            let mut specs: Vec<LinkedImageSpec> = (0..cap).map(|_| empty_linked()).collect();
            let mut n = cap;
            // SAFETY: `specs` has room for `n` entries.
            let r = unsafe { (api.rbd_list_children3)(self.raw, specs.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE && n > cap && n <= MAX_LIST {
                cap = n;
                continue;
            }
            check(r, || format!("Listing the clones of {}", self.what()))?;
            let count = n.min(cap);
            let out = specs[..count]
                .iter()
                .map(|s| {
                    // SAFETY: librbd filled these entries with valid strings.
                    let (pool, image) = unsafe { (string(s.pool_name), string(s.image_name)) };
                    if s.trash {
                        format!("{pool}/{image} (in the trash)")
                    } else {
                        format!("{pool}/{image}")
                    }
                })
                .collect();
            // SAFETY: frees what librbd allocated in the first `count` entries.
            unsafe { (api.rbd_linked_image_spec_list_cleanup)(specs.as_mut_ptr(), count) };
            return Ok(out);
        }
    }

    /// The image this one was cloned from: `(pool, image, snapshot)`, or `None`.
    pub fn parent(&self) -> Result<Option<(String, String, String)>> {
        let api = self.api();
        let mut img = empty_linked();
        let mut snap = SnapSpec {
            id: 0,
            namespace_type: 0,
            name: std::ptr::null_mut(),
        };
        // SAFETY: valid image handle and out-structures; on success both are cleaned below.
        let r = unsafe { (api.rbd_get_parent)(self.raw, &mut img, &mut snap) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check(r, || format!("Parent of {}", self.what()))?;
        // SAFETY: librbd filled the structures with valid strings; they are freed once.
        let out = unsafe {
            let out = (
                string(img.pool_name),
                string(img.image_name),
                string(snap.name),
            );
            (api.rbd_linked_image_spec_cleanup)(&mut img);
            (api.rbd_snap_spec_cleanup)(&mut snap);
            out
        };
        Ok(Some(out))
    }

    /// The value of image metadata `key` (`rbd image-meta get`), if set.
    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let k = cstr(key)?;
        let mut cap = 256usize;
        loop {
            let mut buf = vec![0u8; cap];
            let mut len = cap;
            // SAFETY: valid image handle, NUL-terminated key, a buffer of `len` bytes.
            let r = unsafe {
                (self.api().rbd_metadata_get)(
                    self.raw,
                    k.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            if r == -libc::ENOENT {
                return Ok(None);
            }
            if r == -libc::ERANGE && len > cap && len <= 1 << 20 {
                cap = len;
                continue;
            }
            check(r, || format!("Metadata {key} of {}", self.what()))?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
    }

    /// Sets image metadata `key` to `value`.
    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: valid image handle and NUL-terminated strings.
        let r = unsafe { (self.api().rbd_metadata_set)(self.raw, k.as_ptr(), v.as_ptr()) };
        check(r, || format!("Setting metadata {key} of {}", self.what())).map(|_| ())
    }

    /// Removes image metadata `key` (absent is fine).
    pub fn remove_metadata(&self, key: &str) -> Result<()> {
        let k = cstr(key)?;
        // SAFETY: valid image handle and NUL-terminated key.
        let r = unsafe { (self.api().rbd_metadata_remove)(self.raw, k.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r, || format!("Removing metadata {key} of {}", self.what())).map(|_| ())
    }

    /// Reports the extents of `[offset, offset + len)` that changed since snapshot `from` (or,
    /// with `None`, that are allocated) to `f(offset, len, exists)`; `exists` is false for
    /// extents discarded since `from`. With `include_parent`, a clone's parent counts too; with
    /// `whole_object`, extents are whole objects and come from the object map without reading
    /// the objects (fast-diff). `f` returns false to stop.
    pub fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        include_parent: bool,
        whole_object: bool,
        f: &mut dyn FnMut(u64, u64, bool) -> bool,
    ) -> Result<()> {
        let s: Option<CString> = from.map(cstr).transpose()?;
        let sp = s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut sink = DiffSink { f, stopped: false };
        // SAFETY: valid image handle; the callback gets `sink`, which outlives the call, and
        // does not unwind (it catches panics).
        let r = unsafe {
            (self.api().rbd_diff_iterate2)(
                self.raw,
                sp,
                offset,
                len,
                include_parent as u8,
                whole_object as u8,
                diff_callback,
                &mut sink as *mut DiffSink<'_> as *mut c_void,
            )
        };
        if sink.stopped && r == STOP {
            return Ok(());
        }
        check(r, || {
            format!("Changed extents of {} since {from:?}", self.what())
        })
        .map(|_| ())
    }
}

fn empty_linked() -> LinkedImageSpec {
    LinkedImageSpec {
        pool_id: 0,
        pool_name: std::ptr::null_mut(),
        pool_namespace: std::ptr::null_mut(),
        image_id: std::ptr::null_mut(),
        image_name: std::ptr::null_mut(),
        trash: false,
    }
}

/// Whether an error is librbd's "no such image or snapshot".
pub fn is_not_found(e: &StorageError) -> bool {
    matches!(e, StorageError::NotFound(_))
}
