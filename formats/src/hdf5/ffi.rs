//! The HDF5 C library, loaded at run time, behind a small safe interface.
//!
//! Quarry has no build-time dependency on HDF5: the shared library is found when a `.hdf5`
//! dataset is first touched (see [`CANDIDATES`]; `QUARRY_HDF5_LIB` names one explicitly) and
//! stays loaded for the life of the process. Only the 1.10+ ABI is supported (`hid_t` is 64
//! bits), and only calls whose signatures and structs are the same from 1.10 to 2.0 are used.
//!
//! The library builds Debian and most distributions ship are not thread-safe, so every call
//! runs under one global lock: [`lock`] hands out an [`Hdf5`] guard, all calls are its methods,
//! and every [`Id`] borrows the guard, so ids are closed (on drop) before the lock is released.
//! A failing call (a negative return) becomes an [`H5Error`] naming the call and carrying the
//! library's own error stack; automatic error printing is turned off.
//!
//! This module holds all of the format's `unsafe` code.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::fmt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};

use libloading::Library;

#[allow(non_camel_case_types)]
type hid_t = i64;
#[allow(non_camel_case_types)]
type herr_t = c_int;
#[allow(non_camel_case_types)]
type htri_t = c_int;
#[allow(non_camel_case_types)]
type hsize_t = u64;
#[allow(non_camel_case_types)]
type hssize_t = i64;

/// `H5P_DEFAULT`, `H5S_ALL` and `H5E_DEFAULT` are all the id 0.
const DEFAULT: hid_t = 0;
const H5F_ACC_RDONLY: c_uint = 0x0000;
const H5F_ACC_EXCL: c_uint = 0x0004;
const H5_INDEX_NAME: c_int = 0;
const H5_ITER_INC: c_int = 0;
const H5E_WALK_DOWNWARD: c_int = 1;
const H5S_SCALAR: c_int = 0;
const H5S_SIMPLE: c_int = 1;
const H5S_SELECT_SET: c_int = 0;
const H5I_GROUP: c_int = 2;
const H5I_DATATYPE: c_int = 3;
const H5I_DATASET: c_int = 5;
const H5T_STR_NULLPAD: c_int = 1;
const H5L_TYPE_HARD: c_int = 0;
const H5L_TYPE_SOFT: c_int = 1;
const H5L_TYPE_EXTERNAL: c_int = 64;

/// Where the library is looked for, in order, after `QUARRY_HDF5_LIB`.
pub const CANDIDATES: &[&str] = &[
    "libhdf5_serial.so.103",
    "libhdf5.so",
    "libhdf5.so.310",
    "libhdf5.so.200",
    "libhdf5.so.103",
    #[cfg(target_os = "macos")]
    "libhdf5.dylib",
];

/// The environment variable naming the HDF5 shared library to load.
pub const LIB_ENV: &str = "QUARRY_HDF5_LIB";

type AttrOp =
    Option<unsafe extern "C" fn(hid_t, *const c_char, *const c_void, *mut c_void) -> herr_t>;
type WalkOp = Option<unsafe extern "C" fn(c_uint, *const ErrorEntry, *mut c_void) -> herr_t>;
type AutoOp = Option<unsafe extern "C" fn(hid_t, *mut c_void) -> herr_t>;
/// `H5Literate2`/`H5Literate`: the callback has `AttrOp`'s shape (its info pointer not read).
type LinkIterate =
    unsafe extern "C" fn(hid_t, c_int, c_int, *mut hsize_t, AttrOp, *mut c_void) -> herr_t;

/// `H5E_error2_t`.
#[repr(C)]
struct ErrorEntry {
    cls_id: hid_t,
    maj_num: hid_t,
    min_num: hid_t,
    line: c_uint,
    func_name: *const c_char,
    file_name: *const c_char,
    desc: *const c_char,
}

/// `H5G_info_t`, with room to spare.
#[repr(C)]
#[derive(Default)]
struct GroupInfo {
    storage_type: c_int,
    nlinks: hsize_t,
    max_corder: i64,
    mounted: u64,
    spare: [u64; 4],
}

/// The variant of `H5Oget_info` the loaded library has. Every variant's struct starts with
/// `unsigned long fileno` and then the object's place in that file: an `H5O_token_t` (16
/// bytes, 1.12+) or an `haddr_t` (8 bytes, 1.10); the rest is not read.
#[derive(Clone, Copy)]
enum ObjectInfoCall {
    /// `H5Oget_info3(obj, H5O_info2_t *, fields)` or `H5Oget_info2(obj, H5O_info1_t *, fields)`.
    WithFields(unsafe extern "C" fn(hid_t, *mut c_void, c_uint) -> herr_t),
    /// `H5Oget_info1(obj, H5O_info1_t *)`: fills the whole (larger) struct.
    Plain(unsafe extern "C" fn(hid_t, *mut c_void) -> herr_t),
}

/// `H5O_INFO_BASIC`: fileno, address or token, type, reference count.
const H5O_INFO_BASIC: c_uint = 0x0001;
/// Room for any `H5O_info*_t` (the largest, 1.10's with header info, is under 200 bytes).
const OBJECT_INFO_WORDS: usize = 64;

impl ObjectInfoCall {
    fn find(lib: &Library) -> Option<ObjectInfoCall> {
        for name in [&b"H5Oget_info3\0"[..], &b"H5Oget_info2\0"[..]] {
            // SAFETY: both are herr_t (hid_t obj, H5O_info*_t *info, unsigned fields).
            if let Ok(f) = unsafe {
                lib.get::<unsafe extern "C" fn(hid_t, *mut c_void, c_uint) -> herr_t>(name)
            } {
                return Some(ObjectInfoCall::WithFields(*f));
            }
        }
        // SAFETY: herr_t H5Oget_info1(hid_t obj, H5O_info1_t *info).
        unsafe { lib.get::<unsafe extern "C" fn(hid_t, *mut c_void) -> herr_t>(b"H5Oget_info1\0") }
            .ok()
            .map(|f| ObjectInfoCall::Plain(*f))
    }
}

/// Where an object lives: the file it is in and its place there. Two paths lead to one object
/// exactly when their addresses are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectAddr {
    fileno: u64,
    token: [u8; 16],
}

/// What kind of link a name in a group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A hard link: the name is the object (an object may have several).
    Hard,
    /// A soft link: a path inside the file, resolved when opened.
    Soft,
    /// An external link: a path in another file.
    External,
    /// A user-defined link class.
    Other(c_int),
}

macro_rules! api {
    ($($name:ident : fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// The library's entry points.
        #[allow(non_snake_case)]
        struct Api {
            $($name: unsafe extern "C" fn($($arg),*) -> $ret,)*
            /// `H5Treclaim` (1.12+) or `H5Dvlen_reclaim` (1.10): same signature.
            reclaim: Option<unsafe extern "C" fn(hid_t, hid_t, hid_t, *mut c_void) -> herr_t>,
            /// `H5Pset_file_locking` (1.10.7+, 1.12.1+).
            set_file_locking: Option<unsafe extern "C" fn(hid_t, c_uint, c_uint) -> herr_t>,
            /// `H5FD_sec2_init`: the id of the default (POSIX) file driver.
            sec2_init: Option<unsafe extern "C" fn() -> hid_t>,
            /// How to learn an object's address: `H5Oget_info3` (1.12+), else `H5Oget_info2`
            /// (1.10.3+), else `H5Oget_info1` (see [`ObjectInfoCall`]).
            object_info: Option<ObjectInfoCall>,
            /// `H5Lget_info2` (1.12+) or `H5Lget_info` (1.10): same signature, and both
            /// structs start with the link's `H5L_type_t`.
            link_info: Option<unsafe extern "C" fn(hid_t, *const c_char, *mut c_void, hid_t) -> herr_t>,
            /// `H5Literate2` (1.12+) or `H5Literate` (1.10): same signature, the callback's
            /// info struct (not read) differing.
            link_iterate: Option<LinkIterate>,
            t_c_s1: hid_t,
            t_std_i64le: hid_t,
            t_native_llong: hid_t,
            p_group_create: hid_t,
            p_dataset_create: hid_t,
            p_file_access: hid_t,
            _lib: Library,
        }

        impl Api {
            /// Looks every entry point up in `lib`.
            ///
            /// # Safety
            /// `lib` must be an HDF5 1.10+ library: the symbols are taken to have the
            /// signatures declared above.
            #[allow(non_snake_case)]
            unsafe fn load(lib: Library) -> Result<Api, String> {
                $(
                    // SAFETY: the caller vouches that `lib` is HDF5, whose entry point of this
                    // name has this signature (unchanged from 1.10 to 2.0).
                    let $name = *unsafe {
                        lib.get::<unsafe extern "C" fn($($arg),*) -> $ret>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    }
                    .map_err(|e| format!("{}: {e}", stringify!($name)))?;
                )*
                let mut reclaim = None;
                for name in [&b"H5Treclaim\0"[..], &b"H5Dvlen_reclaim\0"[..]] {
                    // SAFETY: both have the signature
                    // herr_t (hid_t type, hid_t space, hid_t plist, void *buf).
                    if let Ok(f) = unsafe {
                        lib.get::<unsafe extern "C" fn(hid_t, hid_t, hid_t, *mut c_void) -> herr_t>(name)
                    } {
                        reclaim = Some(*f);
                        break;
                    }
                }
                // SAFETY: herr_t H5Pset_file_locking(hid_t fapl, hbool_t use, hbool_t ignore);
                // hbool_t is passed as an int-sized argument by the C calling convention.
                let set_file_locking = unsafe {
                    lib.get::<unsafe extern "C" fn(hid_t, c_uint, c_uint) -> herr_t>(
                        b"H5Pset_file_locking\0",
                    )
                }
                .ok()
                .map(|f| *f);
                // SAFETY: hid_t H5FD_sec2_init(void).
                let sec2_init = unsafe {
                    lib.get::<unsafe extern "C" fn() -> hid_t>(b"H5FD_sec2_init\0")
                }
                .ok()
                .map(|f| *f);
                let object_info = ObjectInfoCall::find(&lib);
                let mut link_info = None;
                for name in [&b"H5Lget_info2\0"[..], &b"H5Lget_info\0"[..]] {
                    // SAFETY: both are herr_t (hid_t loc, const char *name, H5L_info*_t *info,
                    // hid_t lapl); the structs differ only after their first field.
                    if let Ok(f) = unsafe {
                        lib.get::<unsafe extern "C" fn(hid_t, *const c_char, *mut c_void, hid_t) -> herr_t>(name)
                    } {
                        link_info = Some(*f);
                        break;
                    }
                }
                let mut link_iterate = None;
                for name in [&b"H5Literate2\0"[..], &b"H5Literate\0"[..]] {
                    // SAFETY: both are herr_t (hid_t group, H5_index_t, H5_iter_order_t,
                    // hsize_t *idx, callback, void *data); see `LinkIterate`.
                    if let Ok(f) = unsafe { lib.get::<LinkIterate>(name) } {
                        link_iterate = Some(*f);
                        break;
                    }
                }
                let mut api = Api {
                    $($name,)*
                    reclaim,
                    set_file_locking,
                    sec2_init,
                    object_info,
                    link_info,
                    link_iterate,
                    t_c_s1: -1,
                    t_std_i64le: -1,
                    t_native_llong: -1,
                    p_group_create: -1,
                    p_dataset_create: -1,
                    p_file_access: -1,
                    _lib: lib,
                };
                // SAFETY: H5open takes nothing and initialises the library (idempotent).
                if unsafe { (api.H5open)() } < 0 {
                    return Err("H5open failed".into());
                }
                let global = |name: &[u8]| -> Result<hid_t, String> {
                    // SAFETY: the H5T_*_g globals are hid_t variables, set by H5open above.
                    unsafe {
                        let p = api
                            ._lib
                            .get::<*const hid_t>(name)
                            .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(name)))?;
                        Ok(**p)
                    }
                };
                let t_c_s1 = global(b"H5T_C_S1_g\0")?;
                let t_std_i64le = global(b"H5T_STD_I64LE_g\0")?;
                let t_native_llong = global(b"H5T_NATIVE_LLONG_g\0")?;
                let p_group_create = global(b"H5P_CLS_GROUP_CREATE_ID_g\0")?;
                let p_dataset_create = global(b"H5P_CLS_DATASET_CREATE_ID_g\0")?;
                api.t_c_s1 = t_c_s1;
                api.t_std_i64le = t_std_i64le;
                api.t_native_llong = t_native_llong;
                api.p_group_create = p_group_create;
                api.p_dataset_create = p_dataset_create;
                api.p_file_access = global(b"H5P_CLS_FILE_ACCESS_ID_g\0")?;
                Ok(api)
            }
        }
    };
}

api! {
    H5open: fn() -> herr_t;
    H5get_libversion: fn(*mut c_uint, *mut c_uint, *mut c_uint) -> herr_t;
    H5free_memory: fn(*mut c_void) -> herr_t;
    H5Eset_auto2: fn(hid_t, AutoOp, *mut c_void) -> herr_t;
    H5Ewalk2: fn(hid_t, c_int, WalkOp, *mut c_void) -> herr_t;
    H5Eclear2: fn(hid_t) -> herr_t;
    H5Fopen: fn(*const c_char, c_uint, hid_t) -> hid_t;
    H5Fcreate: fn(*const c_char, c_uint, hid_t, hid_t) -> hid_t;
    H5Fclose: fn(hid_t) -> herr_t;
    H5Gopen2: fn(hid_t, *const c_char, hid_t) -> hid_t;
    H5Gcreate2: fn(hid_t, *const c_char, hid_t, hid_t, hid_t) -> hid_t;
    H5Gget_info: fn(hid_t, *mut GroupInfo) -> herr_t;
    H5Gclose: fn(hid_t) -> herr_t;
    H5Lget_name_by_idx: fn(hid_t, *const c_char, c_int, c_int, hsize_t, *mut c_char, usize, hid_t) -> isize;
    H5Lexists: fn(hid_t, *const c_char, hid_t) -> htri_t;
    H5Oopen: fn(hid_t, *const c_char, hid_t) -> hid_t;
    H5Oclose: fn(hid_t) -> herr_t;
    H5Ocopy: fn(hid_t, *const c_char, hid_t, *const c_char, hid_t, hid_t) -> herr_t;
    H5Iget_type: fn(hid_t) -> c_int;
    H5Dopen2: fn(hid_t, *const c_char, hid_t) -> hid_t;
    H5Dcreate2: fn(hid_t, *const c_char, hid_t, hid_t, hid_t, hid_t, hid_t) -> hid_t;
    H5Dget_type: fn(hid_t) -> hid_t;
    H5Dget_space: fn(hid_t) -> hid_t;
    H5Dread: fn(hid_t, hid_t, hid_t, hid_t, hid_t, *mut c_void) -> herr_t;
    H5Dwrite: fn(hid_t, hid_t, hid_t, hid_t, hid_t, *const c_void) -> herr_t;
    H5Dclose: fn(hid_t) -> herr_t;
    H5Aiterate2: fn(hid_t, c_int, c_int, *mut hsize_t, AttrOp, *mut c_void) -> herr_t;
    H5Aexists: fn(hid_t, *const c_char) -> htri_t;
    H5Aopen: fn(hid_t, *const c_char, hid_t) -> hid_t;
    H5Acreate2: fn(hid_t, *const c_char, hid_t, hid_t, hid_t, hid_t) -> hid_t;
    H5Aget_type: fn(hid_t) -> hid_t;
    H5Aget_space: fn(hid_t) -> hid_t;
    H5Aread: fn(hid_t, hid_t, *mut c_void) -> herr_t;
    H5Awrite: fn(hid_t, hid_t, *const c_void) -> herr_t;
    H5Aclose: fn(hid_t) -> herr_t;
    H5Tget_class: fn(hid_t) -> c_int;
    H5Tget_size: fn(hid_t) -> usize;
    H5Tget_sign: fn(hid_t) -> c_int;
    H5Tget_order: fn(hid_t) -> c_int;
    H5Tget_strpad: fn(hid_t) -> c_int;
    H5Tis_variable_str: fn(hid_t) -> htri_t;
    H5Tdetect_class: fn(hid_t, c_int) -> htri_t;
    H5Tget_super: fn(hid_t) -> hid_t;
    H5Tget_nmembers: fn(hid_t) -> c_int;
    H5Tget_member_name: fn(hid_t, c_uint) -> *mut c_char;
    H5Tcopy: fn(hid_t) -> hid_t;
    H5Tset_size: fn(hid_t, usize) -> herr_t;
    H5Tset_strpad: fn(hid_t, c_int) -> herr_t;
    H5Tclose: fn(hid_t) -> herr_t;
    H5Screate: fn(c_int) -> hid_t;
    H5Screate_simple: fn(c_int, *const hsize_t, *const hsize_t) -> hid_t;
    H5Sget_simple_extent_type: fn(hid_t) -> c_int;
    H5Sget_simple_extent_ndims: fn(hid_t) -> c_int;
    H5Sget_simple_extent_dims: fn(hid_t, *mut hsize_t, *mut hsize_t) -> c_int;
    H5Sget_simple_extent_npoints: fn(hid_t) -> hssize_t;
    H5Sselect_hyperslab: fn(hid_t, c_int, *const hsize_t, *const hsize_t, *const hsize_t, *const hsize_t) -> herr_t;
    H5Sclose: fn(hid_t) -> herr_t;
    H5Pcreate: fn(hid_t) -> hid_t;
    H5Pset_obj_track_times: fn(hid_t, c_uint) -> herr_t;
    H5Pclose: fn(hid_t) -> herr_t;
    H5Pget_driver: fn(hid_t) -> hid_t;
    H5Fget_access_plist: fn(hid_t) -> hid_t;
    H5Fget_vfd_handle: fn(hid_t, hid_t, *mut *mut c_void) -> herr_t;
}

/// A failed library call: which one, and what the library's error stack said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H5Error {
    pub call: &'static str,
    pub detail: String,
}

impl fmt::Display for H5Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{} failed", self.call)
        } else {
            write!(f, "{} failed: {}", self.call, self.detail)
        }
    }
}

fn err(call: &'static str, detail: impl Into<String>) -> H5Error {
    H5Error {
        call,
        detail: detail.into(),
    }
}

/// Why the library could not be loaded: the message tells the user what to install or set.
pub fn load_error(tried: &[String], why: &str) -> String {
    format!(
        "the HDF5 library (libhdf5 1.10 or newer) could not be loaded ({why}; tried {}): \
         install it (Debian/Ubuntu: `apt install libhdf5-103-1`; macOS: `brew install hdf5`) \
         or set {LIB_ENV} to the path of libhdf5.so",
        tried.join(", ")
    )
}

/// Loads the first of `names` that opens and is HDF5 1.10 or newer.
pub fn load_library(names: &[String]) -> Result<(), String> {
    load_api(names).map(|_| ())
}

fn load_api(names: &[String]) -> Result<Api, String> {
    let mut last = String::from("no candidates");
    for name in names {
        // SAFETY: loading a shared library runs its initialisers; the candidates are HDF5
        // library names (or the one the user named), whose initialisers are benign.
        let lib = match unsafe { Library::new(name) } {
            Ok(lib) => lib,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        // SAFETY: a library with one of these names is taken to be HDF5; a library that
        // lacks any of the entry points is refused by `load`.
        let api = match unsafe { Api::load(lib) } {
            Ok(api) => api,
            Err(e) => {
                last = format!("{name} is not a usable HDF5 library: {e}");
                continue;
            }
        };
        let (mut maj, mut min, mut rel) = (0, 0, 0);
        // SAFETY: three valid out-pointers.
        unsafe { (api.H5get_libversion)(&mut maj, &mut min, &mut rel) };
        if (maj, min) < (1, 10) {
            last = format!("{name} is HDF5 {maj}.{min}.{rel}; 1.10 or newer is needed");
            continue;
        }
        // SAFETY: H5E_DEFAULT and no handler: turns automatic error printing off.
        unsafe { (api.H5Eset_auto2)(DEFAULT, None, std::ptr::null_mut()) };
        return Ok(api);
    }
    Err(load_error(names, &last))
}

/// The library names to try: `QUARRY_HDF5_LIB` alone when set, else [`CANDIDATES`].
pub fn candidates() -> Vec<String> {
    match std::env::var_os(LIB_ENV) {
        Some(v) if !v.is_empty() => vec![v.to_string_lossy().into_owned()],
        _ => CANDIDATES.iter().map(|s| s.to_string()).collect(),
    }
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

/// Exclusive use of the library for as long as the guard lives.
pub struct Hdf5 {
    api: &'static Api,
    _guard: MutexGuard<'static, ()>,
}

/// Takes the global HDF5 lock, loading the library on first use. The error is the message
/// [`load_error`] writes.
pub fn lock() -> Result<Hdf5, String> {
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let api = API
        .get_or_init(|| load_api(&candidates()))
        .as_ref()
        .map_err(String::clone)?;
    Ok(Hdf5 { api, _guard: guard })
}

/// What an [`Id`] refers to (which close call it needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Group,
    Object,
    Dataset,
    Attr,
    Type,
    Space,
    Plist,
}

/// An open HDF5 identifier, closed when dropped (while the lock is still held).
pub struct Id<'h> {
    h: &'h Hdf5,
    id: hid_t,
    kind: Kind,
}

impl Drop for Id<'_> {
    fn drop(&mut self) {
        if self.id >= 0 {
            let _ = self.h.close_raw(self.id, self.kind);
        }
    }
}

impl Id<'_> {
    /// Closes now, reporting failure (a file's close flushes it).
    pub fn close(mut self) -> Result<(), H5Error> {
        let id = std::mem::replace(&mut self.id, -1);
        self.h.close_raw(id, self.kind)
    }
}

/// What a [`Hdf5::open_object`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Group,
    Dataset,
    NamedType,
    Other,
}

/// A datatype's description, as far as Quarry needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub class: TypeClass,
    /// Bytes per element (for a variable-length type: of its in-memory handle).
    pub size: usize,
    /// Big-endian (for integers, floats and enums).
    pub big_endian: bool,
    /// Signed (for integers and enums).
    pub signed: bool,
    /// Holds variable-length data somewhere (vlen strings or sequences).
    pub has_vlen: bool,
    /// For enums: the member names, in order.
    pub members: Vec<String>,
}

/// `H5T_class_t`, with the base of an enum folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeClass {
    Integer,
    Float,
    /// Fixed-length string.
    String,
    /// Variable-length string.
    VarString,
    /// An enum over an integer base (h5py's bool is `FALSE`/`TRUE` over int8).
    Enum,
    Other(c_int),
}

/// The shape of a dataspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    Scalar,
    Simple(Vec<u64>),
    /// No elements at all (`H5S_NULL`).
    Null,
}

impl Extent {
    pub fn elements(&self) -> u64 {
        match self {
            Extent::Scalar => 1,
            Extent::Simple(d) => d.iter().product(),
            Extent::Null => 0,
        }
    }
}

fn cstring(call: &'static str, s: &str) -> Result<CString, H5Error> {
    CString::new(s).map_err(|_| err(call, format!("the name {s:?} holds a NUL byte")))
}

fn path_cstring(call: &'static str, p: &Path) -> Result<CString, H5Error> {
    let s = p
        .to_str()
        .ok_or_else(|| err(call, format!("{} is not UTF-8", p.display())))?;
    cstring(call, s)
}

unsafe extern "C" fn collect_error(
    _n: c_uint,
    entry: *const ErrorEntry,
    data: *mut c_void,
) -> herr_t {
    // SAFETY: `data` is the `&mut Vec<String>` `stack_detail` passed; `entry` points to a
    // valid H5E_error2_t for the duration of the call, whose `desc` is null or a C string.
    unsafe {
        let out = &mut *(data as *mut Vec<String>);
        if let Some(e) = entry.as_ref()
            && !e.desc.is_null()
        {
            let d = CStr::from_ptr(e.desc).to_string_lossy().trim().to_string();
            if !d.is_empty() && !out.contains(&d) {
                out.push(d);
            }
        }
    }
    0
}

unsafe extern "C" fn collect_name(
    _loc: hid_t,
    name: *const c_char,
    _info: *const c_void,
    data: *mut c_void,
) -> herr_t {
    // SAFETY: `data` is the `&mut Vec<Vec<u8>>` `attr_names` or `links` passed; `name` is a C string
    // valid for the call. The info struct is not read (its layout differs between versions).
    unsafe {
        let out = &mut *(data as *mut Vec<Vec<u8>>);
        out.push(CStr::from_ptr(name).to_bytes().to_vec());
    }
    0
}

impl Hdf5 {
    /// The error for a failed `call`, with the library's error stack (innermost last).
    fn fail(&self, call: &'static str) -> H5Error {
        let mut descs: Vec<String> = Vec::new();
        // SAFETY: walks the default error stack with a callback that only reads the entries;
        // `descs` outlives the call.
        unsafe {
            (self.api.H5Ewalk2)(
                DEFAULT,
                H5E_WALK_DOWNWARD,
                Some(collect_error),
                &mut descs as *mut Vec<String> as *mut c_void,
            );
            (self.api.H5Eclear2)(DEFAULT);
        }
        err(call, descs.join("; "))
    }

    fn id(&self, call: &'static str, raw: hid_t, kind: Kind) -> Result<Id<'_>, H5Error> {
        if raw < 0 {
            Err(self.fail(call))
        } else {
            Ok(Id {
                h: self,
                id: raw,
                kind,
            })
        }
    }

    fn check(&self, call: &'static str, ret: herr_t) -> Result<(), H5Error> {
        if ret < 0 {
            Err(self.fail(call))
        } else {
            Ok(())
        }
    }

    fn tri(&self, call: &'static str, ret: htri_t) -> Result<bool, H5Error> {
        if ret < 0 {
            Err(self.fail(call))
        } else {
            Ok(ret > 0)
        }
    }

    fn close_raw(&self, id: hid_t, kind: Kind) -> Result<(), H5Error> {
        let a = self.api;
        // SAFETY: `id` is an open identifier of this kind, closed exactly once.
        let (call, ret) = unsafe {
            match kind {
                Kind::File => ("H5Fclose", (a.H5Fclose)(id)),
                Kind::Group => ("H5Gclose", (a.H5Gclose)(id)),
                Kind::Object => ("H5Oclose", (a.H5Oclose)(id)),
                Kind::Dataset => ("H5Dclose", (a.H5Dclose)(id)),
                Kind::Attr => ("H5Aclose", (a.H5Aclose)(id)),
                Kind::Type => ("H5Tclose", (a.H5Tclose)(id)),
                Kind::Space => ("H5Sclose", (a.H5Sclose)(id)),
                Kind::Plist => ("H5Pclose", (a.H5Pclose)(id)),
            }
        };
        self.check(call, ret)
    }

    /// File access properties: no file locks. The library opens files without close-on-exec,
    /// so a process spawned by another thread while a file is open inherits its descriptor;
    /// were it locked, the lock would outlive Quarry's close and keep other programs (h5py)
    /// from opening the file until that process exits. Quarry writes each file once, to a
    /// new path, so the locks protect nothing here.
    fn file_access(&self) -> Result<Id<'_>, H5Error> {
        // SAFETY: a predefined property list class.
        let fapl = self.id(
            "H5Pcreate",
            unsafe { (self.api.H5Pcreate)(self.api.p_file_access) },
            Kind::Plist,
        )?;
        if let Some(set) = self.api.set_file_locking {
            // SAFETY: an open file access property list; locking off, and no error where
            // locks are not supported.
            self.check("H5Pset_file_locking", unsafe { set(fapl.id, 0, 1) })?;
        }
        Ok(fapl)
    }

    /// Marks an open file's descriptor close-on-exec (POSIX driver only), so that processes
    /// spawned later do not inherit it. Best effort: a failure changes nothing else.
    fn close_on_exec(&self, file: &Id<'_>) {
        #[cfg(unix)]
        {
            unsafe extern "C" {
                fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
            }
            // The same values on Linux and macOS.
            const F_GETFD: c_int = 1;
            const F_SETFD: c_int = 2;
            const FD_CLOEXEC: c_int = 1;
            let Some(sec2_init) = self.api.sec2_init else {
                return;
            };
            // SAFETY: an open file.
            let Ok(fapl) = self.id(
                "H5Fget_access_plist",
                unsafe { (self.api.H5Fget_access_plist)(file.id) },
                Kind::Plist,
            ) else {
                return;
            };
            // SAFETY: an open property list; H5FD_sec2_init takes nothing. The driver id
            // H5Pget_driver returns is not to be closed.
            let is_sec2 = unsafe { (self.api.H5Pget_driver)(fapl.id) == sec2_init() };
            if !is_sec2 {
                return;
            }
            let mut handle: *mut c_void = std::ptr::null_mut();
            // SAFETY: an open file using the POSIX driver, whose handle is an `int *` (the
            // file descriptor) that stays valid while the file is open.
            unsafe {
                if (self.api.H5Fget_vfd_handle)(file.id, fapl.id, &mut handle) >= 0
                    && !handle.is_null()
                {
                    let fd = *(handle as *const c_int);
                    let flags = fcntl(fd, F_GETFD);
                    if flags >= 0 {
                        fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
                    }
                }
            }
        }
        #[cfg(not(unix))]
        let _ = file;
    }

    /// Opens an existing file read-only.
    pub fn open_file(&self, path: &Path) -> Result<Id<'_>, H5Error> {
        let c = path_cstring("H5Fopen", path)?;
        let fapl = self.file_access()?;
        // SAFETY: a valid C string, read-only access, an open access property list.
        let raw = unsafe { (self.api.H5Fopen)(c.as_ptr(), H5F_ACC_RDONLY, fapl.id) };
        let file = self.id("H5Fopen", raw, Kind::File)?;
        self.close_on_exec(&file);
        Ok(file)
    }

    /// Creates a new file; fails if `path` exists.
    pub fn create_file(&self, path: &Path) -> Result<Id<'_>, H5Error> {
        let c = path_cstring("H5Fcreate", path)?;
        let fapl = self.file_access()?;
        // SAFETY: a valid C string, exclusive creation, default creation properties, an open
        // access property list.
        let raw = unsafe { (self.api.H5Fcreate)(c.as_ptr(), H5F_ACC_EXCL, DEFAULT, fapl.id) };
        let file = self.id("H5Fcreate", raw, Kind::File)?;
        self.close_on_exec(&file);
        Ok(file)
    }

    /// Whether a link `name` exists in `loc` (`name` one level deep).
    pub fn exists(&self, loc: &Id<'_>, name: &str) -> Result<bool, H5Error> {
        let c = cstring("H5Lexists", name)?;
        // SAFETY: open location, valid C string.
        let ret = unsafe { (self.api.H5Lexists)(loc.id, c.as_ptr(), DEFAULT) };
        self.tri("H5Lexists", ret)
    }

    pub fn open_group(&self, loc: &Id<'_>, name: &str) -> Result<Id<'_>, H5Error> {
        let c = cstring("H5Gopen2", name)?;
        // SAFETY: open location, valid C string.
        let raw = unsafe { (self.api.H5Gopen2)(loc.id, c.as_ptr(), DEFAULT) };
        self.id("H5Gopen2", raw, Kind::Group)
    }

    /// A creation property list of class `class` that records no modification times, so
    /// that the same content makes the same bytes.
    fn timeless(&self, class: hid_t) -> Result<Id<'_>, H5Error> {
        // SAFETY: `class` is a predefined property list class.
        let p = self.id(
            "H5Pcreate",
            unsafe { (self.api.H5Pcreate)(class) },
            Kind::Plist,
        )?;
        // SAFETY: an open object creation property list.
        self.check("H5Pset_obj_track_times", unsafe {
            (self.api.H5Pset_obj_track_times)(p.id, 0)
        })?;
        Ok(p)
    }

    /// Creates a group (recording no modification times).
    pub fn create_group(&self, loc: &Id<'_>, name: &str) -> Result<Id<'_>, H5Error> {
        let c = cstring("H5Gcreate2", name)?;
        let gcpl = self.timeless(self.api.p_group_create)?;
        // SAFETY: open location, valid C string, an open creation property list.
        let raw = unsafe { (self.api.H5Gcreate2)(loc.id, c.as_ptr(), DEFAULT, gcpl.id, DEFAULT) };
        self.id("H5Gcreate2", raw, Kind::Group)
    }

    /// Opens whatever `name` is and says what it is.
    pub fn open_object(&self, loc: &Id<'_>, name: &str) -> Result<(Id<'_>, ObjectKind), H5Error> {
        let c = cstring("H5Oopen", name)?;
        // SAFETY: open location, valid C string.
        let raw = unsafe { (self.api.H5Oopen)(loc.id, c.as_ptr(), DEFAULT) };
        let id = self.id("H5Oopen", raw, Kind::Object)?;
        // SAFETY: an open identifier.
        let kind = match unsafe { (self.api.H5Iget_type)(id.id) } {
            H5I_GROUP => ObjectKind::Group,
            H5I_DATASET => ObjectKind::Dataset,
            H5I_DATATYPE => ObjectKind::NamedType,
            _ => ObjectKind::Other,
        };
        Ok((id, kind))
    }

    /// Where an open object lives (equal for every path to it); `None` when the library has
    /// no `H5Oget_info` this module knows.
    pub fn object_addr(&self, obj: &Id<'_>) -> Result<Option<ObjectAddr>, H5Error> {
        let Some(call) = self.api.object_info else {
            return Ok(None);
        };
        let mut buf = [0u64; OBJECT_INFO_WORDS];
        let p = buf.as_mut_ptr() as *mut c_void;
        // SAFETY: an open object; `buf` is larger than any H5O_info*_t and 8-byte aligned.
        let ret = unsafe {
            match call {
                ObjectInfoCall::WithFields(f) => f(obj.id, p, H5O_INFO_BASIC),
                ObjectInfoCall::Plain(f) => f(obj.id, p),
            }
        };
        self.check("H5Oget_info", ret)?;
        let mut token = [0u8; 16];
        token[..8].copy_from_slice(&buf[1].to_ne_bytes());
        token[8..].copy_from_slice(&buf[2].to_ne_bytes());
        // With 1.10's struct the second 8 bytes are the object's type and reference count
        // rather than the rest of a token: the same for every path to one object, so equality
        // still means "the same object".
        Ok(Some(ObjectAddr {
            fileno: buf[0],
            token,
        }))
    }

    /// What kind of link `name` in `loc` is, without following it.
    pub fn link_kind(&self, loc: &Id<'_>, name: &str) -> Result<LinkKind, H5Error> {
        let Some(f) = self.api.link_info else {
            return Ok(LinkKind::Hard);
        };
        let c = cstring("H5Lget_info", name)?;
        let mut buf = [0u64; 8];
        // SAFETY: open location, valid C string, `buf` larger than any H5L_info*_t.
        let ret = unsafe { f(loc.id, c.as_ptr(), buf.as_mut_ptr() as *mut c_void, DEFAULT) };
        self.check("H5Lget_info", ret)?;
        // The first field, `H5L_type_t`, an int.
        let kind = buf[0].to_ne_bytes();
        let kind = c_int::from_ne_bytes([kind[0], kind[1], kind[2], kind[3]]);
        Ok(match kind {
            H5L_TYPE_HARD => LinkKind::Hard,
            H5L_TYPE_SOFT => LinkKind::Soft,
            H5L_TYPE_EXTERNAL => LinkKind::External,
            other => LinkKind::Other(other),
        })
    }

    /// How many links a group holds.
    pub fn link_count(&self, group: &Id<'_>) -> Result<u64, H5Error> {
        let mut info = GroupInfo::default();
        // SAFETY: open group; `info` is at least as large as H5G_info_t.
        self.check("H5Gget_info", unsafe {
            (self.api.H5Gget_info)(group.id, &mut info)
        })?;
        Ok(info.nlinks)
    }

    /// The names of the links in a group, in name order.
    pub fn links(&self, group: &Id<'_>) -> Result<Vec<String>, H5Error> {
        let Some(iterate) = self.api.link_iterate else {
            return self.links_by_index(group);
        };
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut idx: hsize_t = 0;
        // SAFETY: open group; the callback only pushes names into `names`, which outlives
        // the call. One pass: asking for each name by index costs a sort of the group's
        // links per call when it has no name index, quadratic in its size.
        let ret = unsafe {
            iterate(
                group.id,
                H5_INDEX_NAME,
                H5_ITER_INC,
                &mut idx,
                Some(collect_name),
                &mut names as *mut Vec<Vec<u8>> as *mut c_void,
            )
        };
        self.check("H5Literate", ret)?;
        Ok(names
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect())
    }

    /// [`Hdf5::links`] one name at a time, for a library without `H5Literate`.
    fn links_by_index(&self, group: &Id<'_>) -> Result<Vec<String>, H5Error> {
        let mut info = GroupInfo::default();
        // SAFETY: open group; `info` is at least as large as H5G_info_t.
        self.check("H5Gget_info", unsafe {
            (self.api.H5Gget_info)(group.id, &mut info)
        })?;
        let dot = c".";
        let mut names = Vec::with_capacity(info.nlinks.min(1 << 20) as usize);
        for i in 0..info.nlinks {
            // SAFETY: a null buffer of size 0 asks for the name's length.
            let len = unsafe {
                (self.api.H5Lget_name_by_idx)(
                    group.id,
                    dot.as_ptr(),
                    H5_INDEX_NAME,
                    H5_ITER_INC,
                    i,
                    std::ptr::null_mut(),
                    0,
                    DEFAULT,
                )
            };
            if len < 0 {
                return Err(self.fail("H5Lget_name_by_idx"));
            }
            let mut buf = vec![0u8; len as usize + 1];
            // SAFETY: `buf` holds `len + 1` bytes, room for the name and its NUL.
            let got = unsafe {
                (self.api.H5Lget_name_by_idx)(
                    group.id,
                    dot.as_ptr(),
                    H5_INDEX_NAME,
                    H5_ITER_INC,
                    i,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                    DEFAULT,
                )
            };
            if got < 0 {
                return Err(self.fail("H5Lget_name_by_idx"));
            }
            buf.truncate(got as usize);
            names.push(String::from_utf8_lossy(&buf).into_owned());
        }
        Ok(names)
    }

    /// The names of an object's attributes, in name order.
    pub fn attr_names(&self, obj: &Id<'_>) -> Result<Vec<String>, H5Error> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut idx: hsize_t = 0;
        // SAFETY: open object; the callback only pushes names into `names`, which outlives
        // the call.
        let ret = unsafe {
            (self.api.H5Aiterate2)(
                obj.id,
                H5_INDEX_NAME,
                H5_ITER_INC,
                &mut idx,
                Some(collect_name),
                &mut names as *mut Vec<Vec<u8>> as *mut c_void,
            )
        };
        self.check("H5Aiterate2", ret)?;
        Ok(names
            .into_iter()
            .map(|n| String::from_utf8_lossy(&n).into_owned())
            .collect())
    }

    pub fn attr_exists(&self, obj: &Id<'_>, name: &str) -> Result<bool, H5Error> {
        let c = cstring("H5Aexists", name)?;
        // SAFETY: open object, valid C string.
        let ret = unsafe { (self.api.H5Aexists)(obj.id, c.as_ptr()) };
        self.tri("H5Aexists", ret)
    }

    pub fn open_attr(&self, obj: &Id<'_>, name: &str) -> Result<Id<'_>, H5Error> {
        let c = cstring("H5Aopen", name)?;
        // SAFETY: open object, valid C string.
        let raw = unsafe { (self.api.H5Aopen)(obj.id, c.as_ptr(), DEFAULT) };
        self.id("H5Aopen", raw, Kind::Attr)
    }

    pub fn open_dataset(&self, loc: &Id<'_>, name: &str) -> Result<Id<'_>, H5Error> {
        let c = cstring("H5Dopen2", name)?;
        // SAFETY: open location, valid C string.
        let raw = unsafe { (self.api.H5Dopen2)(loc.id, c.as_ptr(), DEFAULT) };
        self.id("H5Dopen2", raw, Kind::Dataset)
    }

    /// The datatype of a dataset (or of a dataset opened as an object).
    pub fn dataset_type(&self, ds: &Id<'_>) -> Result<Id<'_>, H5Error> {
        // SAFETY: an open dataset.
        let raw = unsafe { (self.api.H5Dget_type)(ds.id) };
        self.id("H5Dget_type", raw, Kind::Type)
    }

    pub fn dataset_space(&self, ds: &Id<'_>) -> Result<Id<'_>, H5Error> {
        // SAFETY: an open dataset.
        let raw = unsafe { (self.api.H5Dget_space)(ds.id) };
        self.id("H5Dget_space", raw, Kind::Space)
    }

    pub fn attr_type(&self, attr: &Id<'_>) -> Result<Id<'_>, H5Error> {
        // SAFETY: an open attribute.
        let raw = unsafe { (self.api.H5Aget_type)(attr.id) };
        self.id("H5Aget_type", raw, Kind::Type)
    }

    pub fn attr_space(&self, attr: &Id<'_>) -> Result<Id<'_>, H5Error> {
        // SAFETY: an open attribute.
        let raw = unsafe { (self.api.H5Aget_space)(attr.id) };
        self.id("H5Aget_space", raw, Kind::Space)
    }

    /// The extent of a dataspace.
    pub fn extent(&self, space: &Id<'_>) -> Result<Extent, H5Error> {
        // SAFETY: an open dataspace.
        let class = unsafe { (self.api.H5Sget_simple_extent_type)(space.id) };
        match class {
            H5S_SCALAR => Ok(Extent::Scalar),
            H5S_SIMPLE => {
                // SAFETY: an open dataspace.
                let rank = unsafe { (self.api.H5Sget_simple_extent_ndims)(space.id) };
                if rank < 0 {
                    return Err(self.fail("H5Sget_simple_extent_ndims"));
                }
                let mut dims = vec![0u64; rank as usize];
                // SAFETY: `dims` holds `rank` elements; maxdims is not wanted.
                let got = unsafe {
                    (self.api.H5Sget_simple_extent_dims)(
                        space.id,
                        dims.as_mut_ptr(),
                        std::ptr::null_mut(),
                    )
                };
                if got < 0 {
                    return Err(self.fail("H5Sget_simple_extent_dims"));
                }
                Ok(Extent::Simple(dims))
            }
            c if c < 0 => Err(self.fail("H5Sget_simple_extent_type")),
            _ => Ok(Extent::Null),
        }
    }

    /// Elements in a dataspace's extent.
    pub fn npoints(&self, space: &Id<'_>) -> Result<u64, H5Error> {
        // SAFETY: an open dataspace.
        let n = unsafe { (self.api.H5Sget_simple_extent_npoints)(space.id) };
        if n < 0 {
            Err(self.fail("H5Sget_simple_extent_npoints"))
        } else {
            Ok(n as u64)
        }
    }

    /// Describes a datatype.
    pub fn type_info(&self, t: &Id<'_>) -> Result<TypeInfo, H5Error> {
        let a = self.api;
        // SAFETY: an open datatype, for all the queries below.
        let class = unsafe { (a.H5Tget_class)(t.id) };
        if class < 0 {
            return Err(self.fail("H5Tget_class"));
        }
        // SAFETY: as above.
        let size = unsafe { (a.H5Tget_size)(t.id) };
        if size == 0 {
            return Err(self.fail("H5Tget_size"));
        }
        // 9 is H5T_VLEN.
        // SAFETY: as above.
        let has_vlen = self.tri("H5Tdetect_class", unsafe { (a.H5Tdetect_class)(t.id, 9) })?;
        let mut info = TypeInfo {
            class: TypeClass::Other(class),
            size,
            big_endian: false,
            signed: false,
            has_vlen,
            members: Vec::new(),
        };
        let order_sign = |id: hid_t| -> Result<(bool, bool), H5Error> {
            // SAFETY: an open integer, float or enum datatype.
            let (order, sign) = unsafe { ((a.H5Tget_order)(id), (a.H5Tget_sign)(id)) };
            if order < 0 {
                return Err(self.fail("H5Tget_order"));
            }
            Ok((order == 1, sign == 1))
        };
        match class {
            0 => {
                info.class = TypeClass::Integer;
                (info.big_endian, info.signed) = order_sign(t.id)?;
            }
            1 => {
                info.class = TypeClass::Float;
                info.big_endian = order_sign(t.id)?.0;
            }
            3 => {
                // SAFETY: an open string datatype.
                let var = self.tri("H5Tis_variable_str", unsafe {
                    (a.H5Tis_variable_str)(t.id)
                })?;
                info.class = if var {
                    info.has_vlen = true;
                    TypeClass::VarString
                } else {
                    TypeClass::String
                };
            }
            8 => {
                info.class = TypeClass::Enum;
                // SAFETY: an open enum datatype.
                let base = self.id(
                    "H5Tget_super",
                    unsafe { (a.H5Tget_super)(t.id) },
                    Kind::Type,
                )?;
                (info.big_endian, info.signed) = order_sign(base.id)?;
                // SAFETY: an open enum datatype.
                let n = unsafe { (a.H5Tget_nmembers)(t.id) };
                if n < 0 {
                    return Err(self.fail("H5Tget_nmembers"));
                }
                for i in 0..n as c_uint {
                    // SAFETY: member `i` exists; the name is allocated by the library and
                    // freed with H5free_memory after copying.
                    unsafe {
                        let p = (a.H5Tget_member_name)(t.id, i);
                        if p.is_null() {
                            return Err(self.fail("H5Tget_member_name"));
                        }
                        info.members
                            .push(CStr::from_ptr(p).to_string_lossy().into_owned());
                        (a.H5free_memory)(p as *mut c_void);
                    }
                }
            }
            _ => {}
        }
        Ok(info)
    }

    /// Reads a whole attribute in its own (file) type: `npoints * size` bytes. Refuses types
    /// holding variable-length data except variable-length strings, read with
    /// [`Hdf5::read_attr_strings`].
    pub fn read_attr_raw(&self, attr: &Id<'_>, t: &Id<'_>) -> Result<Vec<u8>, H5Error> {
        let info = self.type_info(t)?;
        if info.has_vlen {
            return Err(err(
                "H5Aread",
                "variable-length data is read as strings only",
            ));
        }
        let space = self.attr_space(attr)?;
        let n = self.npoints(&space)?;
        let mut buf = vec![0u8; byte_len(n, info.size)?];
        if buf.is_empty() {
            return Ok(buf);
        }
        // SAFETY: `buf` holds every element of the attribute in type `t`.
        let ret = unsafe { (self.api.H5Aread)(attr.id, t.id, buf.as_mut_ptr() as *mut c_void) };
        self.check("H5Aread", ret)?;
        Ok(buf)
    }

    /// Reads a string attribute or dataset (fixed or variable length, any shape) as byte
    /// strings: fixed ones lose their padding (NULs, and spaces when space-padded).
    pub fn read_strings(&self, obj: &Id<'_>) -> Result<Vec<Vec<u8>>, H5Error> {
        let is_attr = obj.kind == Kind::Attr;
        let (t, space) = if is_attr {
            (self.attr_type(obj)?, self.attr_space(obj)?)
        } else {
            (self.dataset_type(obj)?, self.dataset_space(obj)?)
        };
        let info = self.type_info(&t)?;
        let n = self.npoints(&space)?;
        let read = |buf: *mut c_void| -> Result<(), H5Error> {
            // SAFETY: the callers pass a buffer holding every element in type `t`.
            let ret = unsafe {
                if is_attr {
                    (self.api.H5Aread)(obj.id, t.id, buf)
                } else {
                    (self.api.H5Dread)(obj.id, t.id, DEFAULT, DEFAULT, DEFAULT, buf)
                }
            };
            self.check(if is_attr { "H5Aread" } else { "H5Dread" }, ret)
        };
        if n == 0 {
            return Ok(Vec::new());
        }
        match info.class {
            TypeClass::String => {
                let mut raw = vec![0u8; byte_len(n, info.size)?];
                read(raw.as_mut_ptr() as *mut c_void)?;
                Ok(split_fixed(&raw, info.size, self.strpad(&t)))
            }
            TypeClass::VarString => {
                let mut ptrs: Vec<*mut c_char> = vec![std::ptr::null_mut(); byte_len(n, 1)?];
                // The library fills one char* per element with strings it allocates; each is
                // copied, then freed with H5free_memory.
                read(ptrs.as_mut_ptr() as *mut c_void)?;
                let mut out = Vec::with_capacity(ptrs.len());
                for p in ptrs {
                    if p.is_null() {
                        out.push(Vec::new());
                    } else {
                        // SAFETY: a NUL-terminated string the library allocated, freed once.
                        unsafe {
                            out.push(CStr::from_ptr(p).to_bytes().to_vec());
                            (self.api.H5free_memory)(p as *mut c_void);
                        }
                    }
                }
                Ok(out)
            }
            _ => Err(err(
                if is_attr { "H5Aread" } else { "H5Dread" },
                "not a string",
            )),
        }
    }

    /// Copies attribute `name` of `src` onto `dst`, type, shape and value (variable-length
    /// strings and sequences included).
    pub fn copy_attr(&self, src: &Id<'_>, name: &str, dst: &Id<'_>) -> Result<(), H5Error> {
        let attr = self.open_attr(src, name)?;
        let t = self.attr_type(&attr)?;
        let space = self.attr_space(&attr)?;
        let info = self.type_info(&t)?;
        let n = self.npoints(&space)?;
        let c = cstring("H5Acreate2", name)?;
        // SAFETY: open object, valid name, an open type and space.
        let raw =
            unsafe { (self.api.H5Acreate2)(dst.id, c.as_ptr(), t.id, space.id, DEFAULT, DEFAULT) };
        let out = self.id("H5Acreate2", raw, Kind::Attr)?;
        if n == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; byte_len(n, info.size)?];
        // SAFETY: `buf` holds every element in type `t` (for variable-length data: the
        // handles, which point into memory the library allocates and is reclaimed below).
        let ret = unsafe { (self.api.H5Aread)(attr.id, t.id, buf.as_mut_ptr() as *mut c_void) };
        self.check("H5Aread", ret)?;
        // SAFETY: `buf` was filled by H5Aread with `t` and holds every element.
        let wrote = unsafe { (self.api.H5Awrite)(out.id, t.id, buf.as_ptr() as *const c_void) };
        if info.has_vlen {
            match self.api.reclaim {
                // SAFETY: frees what H5Aread allocated into `buf`, once.
                Some(reclaim) => unsafe {
                    reclaim(t.id, space.id, DEFAULT, buf.as_mut_ptr() as *mut c_void);
                },
                None => {
                    return Err(err(
                        "H5Treclaim",
                        "this HDF5 has neither H5Treclaim nor H5Dvlen_reclaim",
                    ));
                }
            }
        }
        self.check("H5Awrite", wrote)
    }

    /// Writes a scalar 64-bit integer attribute (`<i8`, as h5py writes a Python int).
    pub fn write_attr_i64(&self, obj: &Id<'_>, name: &str, value: i64) -> Result<(), H5Error> {
        let c = cstring("H5Acreate2", name)?;
        // SAFETY: H5S_SCALAR is a valid class.
        let space = self.id(
            "H5Screate",
            unsafe { (self.api.H5Screate)(H5S_SCALAR) },
            Kind::Space,
        )?;
        // SAFETY: open object, valid name, a predefined type, an open space.
        let raw = unsafe {
            (self.api.H5Acreate2)(
                obj.id,
                c.as_ptr(),
                self.api.t_std_i64le,
                space.id,
                DEFAULT,
                DEFAULT,
            )
        };
        let attr = self.id("H5Acreate2", raw, Kind::Attr)?;
        // SAFETY: one native long long, as the memory type says.
        let ret = unsafe {
            (self.api.H5Awrite)(
                attr.id,
                self.api.t_native_llong,
                &value as *const i64 as *const c_void,
            )
        };
        self.check("H5Awrite", ret)
    }

    /// Writes a 1-D dataset of fixed-length, NUL-padded byte strings (numpy `S<n>`), as long
    /// as the longest (at least 1).
    pub fn write_fixed_strings(
        &self,
        loc: &Id<'_>,
        name: &str,
        values: &[Vec<u8>],
    ) -> Result<(), H5Error> {
        let width = values.iter().map(Vec::len).max().unwrap_or(0).max(1);
        // SAFETY: copies a predefined type.
        let t = self.id(
            "H5Tcopy",
            unsafe { (self.api.H5Tcopy)(self.api.t_c_s1) },
            Kind::Type,
        )?;
        // SAFETY: an open, modifiable string type.
        self.check("H5Tset_size", unsafe {
            (self.api.H5Tset_size)(t.id, width)
        })?;
        // SAFETY: as above.
        self.check("H5Tset_strpad", unsafe {
            (self.api.H5Tset_strpad)(t.id, H5T_STR_NULLPAD)
        })?;
        let dims = [values.len() as hsize_t];
        // SAFETY: rank 1, `dims` holds one element; maxdims null (same as dims).
        let space = self.id(
            "H5Screate_simple",
            unsafe { (self.api.H5Screate_simple)(1, dims.as_ptr(), std::ptr::null()) },
            Kind::Space,
        )?;
        let c = cstring("H5Dcreate2", name)?;
        let dcpl = self.timeless(self.api.p_dataset_create)?;
        // SAFETY: open location, valid name, open type, space and creation property list.
        let raw = unsafe {
            (self.api.H5Dcreate2)(
                loc.id,
                c.as_ptr(),
                t.id,
                space.id,
                DEFAULT,
                dcpl.id,
                DEFAULT,
            )
        };
        let ds = self.id("H5Dcreate2", raw, Kind::Dataset)?;
        if values.is_empty() {
            return Ok(());
        }
        let mut buf = vec![0u8; values.len() * width];
        for (slot, v) in buf.chunks_exact_mut(width).zip(values) {
            slot[..v.len()].copy_from_slice(v);
        }
        // SAFETY: `buf` holds every element, `width` bytes each, as the type says.
        let ret = unsafe {
            (self.api.H5Dwrite)(
                ds.id,
                t.id,
                DEFAULT,
                DEFAULT,
                DEFAULT,
                buf.as_ptr() as *const c_void,
            )
        };
        self.check("H5Dwrite", ret)?;
        ds.close()
    }

    /// Reads rows `start..start + count` along the first axis of a dataset of extent `dims`
    /// (all of it for a scalar: `dims` empty), in its own type of `size` bytes per element.
    pub fn read_rows(
        &self,
        ds: &Id<'_>,
        t: &Id<'_>,
        size: usize,
        dims: &[u64],
        start: u64,
        count: u64,
    ) -> Result<Vec<u8>, H5Error> {
        let row: u64 = dims.iter().skip(1).product();
        let n = if dims.is_empty() { 1 } else { row * count };
        let mut buf = vec![0u8; byte_len(n, size)?];
        if n == 0 {
            return Ok(buf);
        }
        if dims.is_empty() {
            // SAFETY: `buf` holds the one element in type `t`.
            let ret = unsafe {
                (self.api.H5Dread)(
                    ds.id,
                    t.id,
                    DEFAULT,
                    DEFAULT,
                    DEFAULT,
                    buf.as_mut_ptr() as *mut c_void,
                )
            };
            self.check("H5Dread", ret)?;
            return Ok(buf);
        }
        let file_space = self.dataset_space(ds)?;
        let mut offset = vec![0u64; dims.len()];
        offset[0] = start;
        let mut block = dims.to_vec();
        block[0] = count;
        // SAFETY: `offset` and `block` have the dataset's rank; null stride and block mean 1.
        self.check("H5Sselect_hyperslab", unsafe {
            (self.api.H5Sselect_hyperslab)(
                file_space.id,
                H5S_SELECT_SET,
                offset.as_ptr(),
                std::ptr::null(),
                block.as_ptr(),
                std::ptr::null(),
            )
        })?;
        // SAFETY: rank and dims as given; maxdims null.
        let mem_space = self.id(
            "H5Screate_simple",
            unsafe {
                (self.api.H5Screate_simple)(block.len() as c_int, block.as_ptr(), std::ptr::null())
            },
            Kind::Space,
        )?;
        // SAFETY: `buf` holds every element of the memory space in type `t`, which holds no
        // variable-length data (the callers check).
        let ret = unsafe {
            (self.api.H5Dread)(
                ds.id,
                t.id,
                mem_space.id,
                file_space.id,
                DEFAULT,
                buf.as_mut_ptr() as *mut c_void,
            )
        };
        self.check("H5Dread", ret)?;
        Ok(buf)
    }

    /// The string padding of a fixed-length string type.
    pub fn strpad(&self, t: &Id<'_>) -> c_int {
        // SAFETY: an open datatype (a non-string one yields an error value, handled as NUL
        // padding).
        unsafe { (self.api.H5Tget_strpad)(t.id) }
    }

    /// Copies object `src_name` of `src` (a group with everything under it) to `dst_name` in
    /// `dst`, possibly in another file.
    pub fn copy_object(
        &self,
        src: &Id<'_>,
        src_name: &str,
        dst: &Id<'_>,
        dst_name: &str,
    ) -> Result<(), H5Error> {
        let s = cstring("H5Ocopy", src_name)?;
        let d = cstring("H5Ocopy", dst_name)?;
        // SAFETY: open locations and valid names; default copy and link-creation properties.
        let ret =
            unsafe { (self.api.H5Ocopy)(src.id, s.as_ptr(), dst.id, d.as_ptr(), DEFAULT, DEFAULT) };
        self.check("H5Ocopy", ret)
    }
}

fn byte_len(n: u64, size: usize) -> Result<usize, H5Error> {
    n.checked_mul(size as u64)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| {
            err(
                "read",
                format!("{n} elements of {size} bytes do not fit in memory"),
            )
        })
}

/// Splits fixed-length strings of `width` bytes, dropping their padding.
pub fn split_fixed(raw: &[u8], width: usize, pad: c_int) -> Vec<Vec<u8>> {
    raw.chunks_exact(width.max(1))
        .map(|s| {
            let s = match s.iter().position(|&b| b == 0) {
                Some(end) => &s[..end],
                None => s,
            };
            let s = if pad == 2 {
                let end = s.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
                &s[..end]
            } else {
                s
            };
            s.to_vec()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_says_what_to_install() {
        let e = load_api(&["/nonexistent/libhdf5.so".into()])
            .err()
            .expect("no library there");
        assert!(e.contains("apt install libhdf5-103-1"), "{e}");
        assert!(e.contains(LIB_ENV), "{e}");
        assert!(e.contains("/nonexistent/libhdf5.so"), "{e}");
    }

    #[test]
    fn a_library_that_is_not_hdf5_is_refused() {
        let e = load_api(&["libc.so.6".into()])
            .err()
            .expect("libc is not HDF5");
        assert!(e.contains("not a usable HDF5 library"), "{e}");
    }

    #[test]
    fn fixed_strings_lose_their_padding() {
        assert_eq!(
            split_fixed(b"demo_1\0\0demo_10\0", 8, 1),
            vec![b"demo_1".to_vec(), b"demo_10".to_vec()]
        );
        assert_eq!(split_fixed(b"ab  ", 4, 2), vec![b"ab".to_vec()]);
    }
}
