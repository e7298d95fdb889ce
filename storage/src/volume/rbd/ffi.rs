//! The C API of librados and librbd (Ceph 16.2 "pacific", `rados/librados.h` and
//! `rbd/librbd.h`), loaded at run time.
//!
//! Why by hand and at run time:
//! - The published Rust bindings (`ceph-rbd`, `librbd-sys`, `ceph-rust`'s rbd parts) have been
//!   unmaintained since 2016–2019 and lack the calls we need (vectored async I/O, write-zeroes,
//!   event notification, `rbd_diff_iterate2`, clone v2 options). The subset we use is ~50 C
//!   functions with plain types; bindgen would need libclang and the Ceph headers at build time.
//! - Loading `librbd.so.1`/`librados.so.2` with `dlopen` (through `libloading`) instead of
//!   linking means a `strata` built with the `rbd` feature builds without Ceph headers or
//!   libraries and starts on machines without them; only using an RBD volume group needs the
//!   libraries, and then a missing one is a clear error naming the package.
//!
//! The signatures below are transcribed from the 16.2 headers; the functions we call are all
//! part of librbd's stable C ABI (soname `librbd.so.1`) since 14.2 or earlier.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

use crate::error::{Result, StorageError};

/// `rados_t`.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`.
pub type IoCtxT = *mut c_void;
/// `rbd_image_t`.
pub type ImageT = *mut c_void;
/// `rbd_completion_t`.
pub type CompletionT = *mut c_void;
/// `rbd_image_options_t`.
pub type ImageOptionsT = *mut c_void;
/// `rbd_callback_t`.
pub type CallbackT = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;
/// `librbd_progress_fn_t`.
pub type ProgressT = Option<unsafe extern "C" fn(u64, u64, *mut c_void) -> c_int>;
/// The `rbd_diff_iterate2` callback: offset, length, whether the extent exists, argument.
pub type DiffCallbackT = unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// `RBD_FEATURE_LAYERING`.
pub const FEATURE_LAYERING: u64 = 1 << 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK`.
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_FEATURE_OBJECT_MAP`.
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
/// `RBD_FEATURE_FAST_DIFF`.
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_IMAGE_OPTION_FORMAT`.
pub const OPTION_FORMAT: c_int = 0;
/// `RBD_IMAGE_OPTION_FEATURES`.
pub const OPTION_FEATURES: c_int = 1;
/// `RBD_IMAGE_OPTION_CLONE_FORMAT`.
pub const OPTION_CLONE_FORMAT: c_int = 12;
/// `EVENT_TYPE_EVENTFD` for `rbd_set_image_notification`.
pub const EVENT_TYPE_EVENTFD: c_int = 2;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero and keep allocated.
pub const WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;
/// `RBD_MAX_BLOCK_NAME_SIZE`.
const MAX_BLOCK_NAME_SIZE: usize = 24;
/// `RBD_MAX_IMAGE_NAME_SIZE`.
const MAX_IMAGE_NAME_SIZE: usize = 96;

/// `rbd_image_info_t`.
#[repr(C)]
#[derive(Debug)]
pub struct ImageInfo {
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub obj_size: u64,
    /// Number of objects.
    pub num_objs: u64,
    /// log2 of the object size.
    pub order: c_int,
    block_name_prefix: [c_char; MAX_BLOCK_NAME_SIZE],
    parent_pool: i64,
    parent_name: [c_char; MAX_IMAGE_NAME_SIZE],
}

impl Default for ImageInfo {
    fn default() -> ImageInfo {
        ImageInfo {
            size: 0,
            obj_size: 0,
            num_objs: 0,
            order: 0,
            block_name_prefix: [0; MAX_BLOCK_NAME_SIZE],
            parent_pool: 0,
            parent_name: [0; MAX_IMAGE_NAME_SIZE],
        }
    }
}

/// `rbd_image_spec_t`.
#[repr(C)]
#[derive(Debug)]
pub struct ImageSpec {
    /// Image id.
    pub id: *mut c_char,
    /// Image name.
    pub name: *mut c_char,
}

/// `rbd_linked_image_spec_t`.
#[repr(C)]
#[derive(Debug)]
pub struct LinkedImageSpec {
    /// Pool id.
    pub pool_id: i64,
    /// Pool name.
    pub pool_name: *mut c_char,
    /// Pool namespace.
    pub pool_namespace: *mut c_char,
    /// Image id.
    pub image_id: *mut c_char,
    /// Image name.
    pub image_name: *mut c_char,
    /// Whether the image is in the trash.
    pub trash: bool,
}

/// `rbd_snap_spec_t`.
#[repr(C)]
#[derive(Debug)]
pub struct SnapSpec {
    /// Snapshot id.
    pub id: u64,
    /// `rbd_snap_namespace_type_t`.
    pub namespace_type: c_int,
    /// Snapshot name.
    pub name: *mut c_char,
}

/// `rbd_snap_info_t`.
#[repr(C)]
#[derive(Debug)]
pub struct SnapInfo {
    /// Snapshot id.
    pub id: u64,
    /// Image size at the snapshot.
    pub size: u64,
    /// Name (NULL in the terminating entry).
    pub name: *const c_char,
}

macro_rules! api {
    ($( $lib:ident $name:ident : fn($($arg:ty),*) $(-> $ret:ty)? ; )*) => {
        /// The functions of librados and librbd we call, resolved once per process.
        #[allow(missing_docs)]
        pub struct Api {
            $( pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
            // The libraries stay loaded for the life of the process (the table is in a static).
            _rbd: Library,
            _rados: Library,
        }

        impl Api {
            fn resolve(rbd: Library, rados: Library) -> std::result::Result<Api, String> {
                Ok(Api {
                    $( $name: {
                        let lib = if stringify!($lib) == "rbd" { &rbd } else { &rados };
                        // SAFETY: the symbol is a function of the library with the signature
                        // transcribed above from the 16.2 headers; the pointer is copied out and
                        // used only while the library stays loaded (it is never unloaded).
                        unsafe {
                            *lib.get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(
                                concat!(stringify!($name), "\0").as_bytes(),
                            )
                            .map_err(|e| format!("{} lacks {}: {e}", stringify!($lib), stringify!($name)))?
                        }
                    }, )*
                    _rbd: rbd,
                    _rados: rados,
                })
            }
        }
    };
}

api! {
    rados rados_create2: fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    rados rados_conf_read_file: fn(RadosT, *const c_char) -> c_int;
    rados rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
    rados rados_connect: fn(RadosT) -> c_int;
    rados rados_shutdown: fn(RadosT);
    rados rados_ioctx_create: fn(RadosT, *const c_char, *mut IoCtxT) -> c_int;
    rados rados_ioctx_destroy: fn(IoCtxT);
    rados rados_set_pool_full_try: fn(IoCtxT);
    rados rados_mon_command: fn(RadosT, *mut *const c_char, usize, *const c_char, usize,
        *mut *mut c_char, *mut usize, *mut *mut c_char, *mut usize) -> c_int;
    rados rados_buffer_free: fn(*mut c_char);
    rbd rbd_version: fn(*mut c_int, *mut c_int, *mut c_int);
    rbd rbd_image_options_create: fn(*mut ImageOptionsT);
    rbd rbd_image_options_destroy: fn(ImageOptionsT);
    rbd rbd_image_options_set_uint64: fn(ImageOptionsT, c_int, u64) -> c_int;
    rbd rbd_create4: fn(IoCtxT, *const c_char, u64, ImageOptionsT) -> c_int;
    rbd rbd_clone3: fn(IoCtxT, *const c_char, *const c_char, IoCtxT, *const c_char,
        ImageOptionsT) -> c_int;
    rbd rbd_remove: fn(IoCtxT, *const c_char) -> c_int;
    rbd rbd_rename: fn(IoCtxT, *const c_char, *const c_char) -> c_int;
    rbd rbd_list2: fn(IoCtxT, *mut ImageSpec, *mut usize) -> c_int;
    rbd rbd_image_spec_list_cleanup: fn(*mut ImageSpec, usize);
    rbd rbd_open: fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd rbd_open_read_only: fn(IoCtxT, *const c_char, *mut ImageT, *const c_char) -> c_int;
    rbd rbd_close: fn(ImageT) -> c_int;
    rbd rbd_get_size: fn(ImageT, *mut u64) -> c_int;
    rbd rbd_get_features: fn(ImageT, *mut u64) -> c_int;
    rbd rbd_stat: fn(ImageT, *mut ImageInfo, usize) -> c_int;
    rbd rbd_resize2: fn(ImageT, u64, bool, ProgressT, *mut c_void) -> c_int;
    rbd rbd_get_parent: fn(ImageT, *mut LinkedImageSpec, *mut SnapSpec) -> c_int;
    rbd rbd_linked_image_spec_cleanup: fn(*mut LinkedImageSpec);
    rbd rbd_snap_spec_cleanup: fn(*mut SnapSpec);
    rbd rbd_list_children3: fn(ImageT, *mut LinkedImageSpec, *mut usize) -> c_int;
    rbd rbd_linked_image_spec_list_cleanup: fn(*mut LinkedImageSpec, usize);
    rbd rbd_snap_list: fn(ImageT, *mut SnapInfo, *mut c_int) -> c_int;
    rbd rbd_snap_list_end: fn(*mut SnapInfo);
    rbd rbd_snap_create: fn(ImageT, *const c_char) -> c_int;
    rbd rbd_snap_remove: fn(ImageT, *const c_char) -> c_int;
    rbd rbd_snap_rename: fn(ImageT, *const c_char, *const c_char) -> c_int;
    rbd rbd_snap_protect: fn(ImageT, *const c_char) -> c_int;
    rbd rbd_snap_unprotect: fn(ImageT, *const c_char) -> c_int;
    rbd rbd_snap_is_protected: fn(ImageT, *const c_char, *mut c_int) -> c_int;
    rbd rbd_snap_set: fn(ImageT, *const c_char) -> c_int;
    rbd rbd_diff_iterate2: fn(ImageT, *const c_char, u64, u64, u8, u8, DiffCallbackT,
        *mut c_void) -> c_int;
    rbd rbd_flush: fn(ImageT) -> c_int;
    rbd rbd_metadata_get: fn(ImageT, *const c_char, *mut c_char, *mut usize) -> c_int;
    rbd rbd_metadata_set: fn(ImageT, *const c_char, *const c_char) -> c_int;
    rbd rbd_metadata_remove: fn(ImageT, *const c_char) -> c_int;
    rbd rbd_set_image_notification: fn(ImageT, c_int, c_int) -> c_int;
    rbd rbd_poll_io_events: fn(ImageT, *mut CompletionT, c_int) -> c_int;
    rbd rbd_aio_create_completion: fn(*mut c_void, CallbackT, *mut CompletionT) -> c_int;
    rbd rbd_aio_release: fn(CompletionT);
    rbd rbd_aio_get_return_value: fn(CompletionT) -> isize;
    rbd rbd_aio_get_arg: fn(CompletionT) -> *mut c_void;
    rbd rbd_aio_readv: fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int;
    rbd rbd_aio_writev: fn(ImageT, *const libc::iovec, c_int, u64, CompletionT) -> c_int;
    rbd rbd_aio_flush: fn(ImageT, CompletionT) -> c_int;
    rbd rbd_aio_write_zeroes: fn(ImageT, u64, usize, CompletionT, c_int, c_int) -> c_int;
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("librbd")
    }
}

/// The shared library names (the runtime packages `librbd1` and `librados2`).
const LIBRBD: &str = "librbd.so.1";
const LIBRADOS: &str = "librados.so.2";

/// The librbd/librados function table, loaded on first use. A missing library is an error
/// naming the package, returned to whoever uses an RBD volume group (and only to them).
pub fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| StorageError::Unsupported(format!("Ceph RBD volume groups: {e}")))
}

fn load() -> std::result::Result<Api, String> {
    let open = |name: &str, package: &str| {
        // SAFETY: loading runs the library's initialisers; librados and librbd are ordinary
        // C/C++ libraries whose static constructors only set up their own state.
        unsafe { Library::new(name) }.map_err(|e| {
            format!("{name} could not be loaded ({e}); install the Debian package {package}")
        })
    };
    let rados = open(LIBRADOS, "librados2")?;
    let rbd = open(LIBRBD, "librbd1")?;
    let api = Api::resolve(rbd, rados)?;
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: rbd_version writes three ints through valid pointers.
    unsafe { (api.rbd_version)(&mut major, &mut minor, &mut extra) };
    // librbd 1.12 is Ceph 14.2 (nautilus), the first with every call above.
    if major != 1 || minor < 12 {
        return Err(format!(
            "librbd {major}.{minor}.{extra} is too old (1.12 or newer, Ceph 14.2+, is needed)"
        ));
    }
    tracing::debug!(major, minor, extra, "librbd loaded");
    Ok(api)
}

/// Turns a librados/librbd return value into a result: negative values are `-errno`.
pub fn check(ret: c_int, what: impl FnOnce() -> String) -> Result<c_int> {
    if ret >= 0 {
        return Ok(ret);
    }
    Err(errno_error(-ret, what()))
}

/// The block layer's error for errno `code` while doing `what`.
pub fn errno_error(code: c_int, what: String) -> StorageError {
    match code {
        libc::ENOENT => StorageError::NotFound(what.into()),
        libc::EEXIST => StorageError::AlreadyExists(what),
        libc::EBUSY | libc::ENOTEMPTY => StorageError::Busy(what),
        libc::EDQUOT => StorageError::OutOfSpace(format!("{what}: the pool's quota is reached")),
        libc::ENOSPC => StorageError::OutOfSpace(format!("{what}: the Ceph cluster is full")),
        _ => StorageError::from_errno(what, code),
    }
}

/// A C string for librados/librbd; names with a NUL byte are refused.
pub fn cstr(s: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(s)
        .map_err(|_| StorageError::InvalidInput(format!("{s:?} contains a NUL byte")))
}

/// Copies a C string librbd returned (NULL gives an empty string).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid during the call.
pub unsafe fn string(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller guarantees a valid NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_info_matches_the_c_layout() {
        // 3 * u64, int, char[24], (padding to 8), int64, char[96]
        assert_eq!(std::mem::size_of::<ImageInfo>(), 24 + 4 + 24 + 4 + 8 + 96);
        assert_eq!(std::mem::size_of::<LinkedImageSpec>(), 48);
        assert_eq!(std::mem::size_of::<SnapSpec>(), 24);
        assert_eq!(std::mem::size_of::<SnapInfo>(), 24);
    }

    #[test]
    fn errno_values_map_to_kinds() {
        assert!(matches!(
            check(-libc::EDQUOT, || "w".into()),
            Err(StorageError::OutOfSpace(_))
        ));
        assert!(matches!(
            check(-libc::EBUSY, || "r".into()),
            Err(StorageError::Busy(_))
        ));
        assert_eq!(check(3, || "x".into()).unwrap(), 3);
    }
}
