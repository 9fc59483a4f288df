//! NVRTC fallback: compiles the embedded kernel sources for the device at hand when the
//! embedded fatbin is absent or has no code for it. libnvrtc is opened here with dlopen (not
//! through cudarc, whose library-name list is tied to one CUDA major version), trying the
//! usual names and folders; the kernels include no CUDA header, so no include path is needed.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use crate::status::{Error, Result, SikvStatus};

type Prog = *mut c_void;
type FnCreate = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type FnCompile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type FnSize = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type FnGet = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type FnDestroy = unsafe extern "C" fn(*mut Prog) -> c_int;
type FnNumArchs = unsafe extern "C" fn(*mut c_int) -> c_int;
type FnArchs = unsafe extern "C" fn(*mut c_int) -> c_int;

fn nvrtc_err(msg: impl Into<String>) -> Error {
    Error::new(SikvStatus::SIKV_ERR_CUDA, msg)
}

fn candidates() -> Vec<String> {
    let mut v = Vec::new();
    // A blank value would open the program itself (dlopen of ""), not a library.
    if let Some(p) = std::env::var("SIKV_NVRTC").ok().filter(|p| !p.trim().is_empty()) {
        v.push(p);
    }
    for name in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
        v.push(name.to_string());
    }
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(h) = std::env::var(var) {
            dirs.push(format!("{h}/lib64"));
            dirs.push(format!("{h}/lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs.push("/usr/lib/aarch64-linux-gnu".into());
    for d in dirs {
        for name in ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"] {
            v.push(format!("{d}/{name}"));
        }
    }
    // pip wheels: nvidia/cu13/lib, nvidia/cuda_nvrtc/lib under any python3 site-packages.
    let home = std::env::var("HOME").unwrap_or_default();
    let mut libs = vec![
        "/usr/lib".to_string(),
        "/usr/local/lib".to_string(),
        format!("{home}/.local/lib"),
    ];
    if let Ok(rd) = std::fs::read_dir(format!("{home}/.pyenv/versions")) {
        for e in rd.flatten() {
            libs.push(format!("{}/lib", e.path().display()));
        }
    }
    for lib in libs {
        if let Ok(rd) = std::fs::read_dir(&lib) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if !n.starts_with("python3") {
                    continue;
                }
                for sp in ["site-packages", "dist-packages"] {
                    for rel in ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"] {
                        v.push(format!("{}/{sp}/{rel}", e.path().display()));
                    }
                }
            }
        }
    }
    v
}

struct Lib(*mut c_void);

impl Lib {
    fn open() -> Result<Lib> {
        for c in candidates() {
            let cs = CString::new(c).unwrap();
            // SAFETY: dlopen with a valid C string.
            let h = unsafe { libc::dlopen(cs.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if !h.is_null() {
                return Ok(Lib(h));
            }
        }
        Err(nvrtc_err(
            "NVRTC fallback: libnvrtc was not found (set SIKV_NVRTC to its path)",
        ))
    }
    fn sym<T: Copy>(&self, name: &str) -> Result<T> {
        let cs = CString::new(name).unwrap();
        // SAFETY: dlsym on an open handle; T is the matching function pointer type.
        let p = unsafe { libc::dlsym(self.0, cs.as_ptr()) };
        if p.is_null() {
            return Err(nvrtc_err(format!("NVRTC fallback: symbol {name} missing in libnvrtc")));
        }
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
    }
}

impl Drop for Lib {
    fn drop(&mut self) {
        // SAFETY: handle from dlopen; nothing of the library is used after the compile.
        unsafe { libc::dlclose(self.0) };
    }
}

/// Compiles `main` (with `headers` as in-memory includes) for compute capability `major.minor`.
/// Returns a cubin (or PTX when NVRTC is older than the device) ready for cuModuleLoadData,
/// NUL-terminated, and a description of what was built.
///
/// Limited to one (head_dim, dtype) variant when `only` is given (entry points
/// of other variants are not instantiated, which makes the compile several times faster).
pub fn compile_variant(
    main: &str,
    headers: &[(&str, &str)],
    major: i32,
    minor: i32,
    only: Option<(u32, &str)>,
) -> Result<(Vec<u8>, String)> {
    // Compiled images are kept for the life of the process: a second context of the same
    // variant on the same architecture loads in milliseconds instead of recompiling.
    static CACHE: std::sync::Mutex<Vec<(String, Vec<u8>, String)>> = std::sync::Mutex::new(Vec::new());
    // Keyed by the source's content: two sources of one length must not share an image.
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        main.hash(&mut h);
        headers.hash(&mut h);
        format!("{major}.{minor}:{only:?}:{:016x}", h.finish())
    };
    if let Some((_, img, desc)) = CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _, _)| *k == key)
    {
        return Ok((img.clone(), desc.clone()));
    }
    let r = compile_uncached(main, headers, major, minor, only)?;
    CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, r.0.clone(), r.1.clone()));
    Ok(r)
}

fn compile_uncached(
    main: &str,
    headers: &[(&str, &str)],
    major: i32,
    minor: i32,
    only: Option<(u32, &str)>,
) -> Result<(Vec<u8>, String)> {
    let main = match only {
        Some((d, dt)) => format!(
            "#define SIKV_ONLY 1\n#define SIKV_IF_d{d}_{dt}(...) __VA_ARGS__\n#define SIKV_IF_{dt}(...) __VA_ARGS__\n{main}"
        ),
        None => main.to_string(),
    };
    let main = main.as_str();
    let lib = Lib::open()?;
    let create: FnCreate = lib.sym("nvrtcCreateProgram")?;
    let compile: FnCompile = lib.sym("nvrtcCompileProgram")?;
    let log_size: FnSize = lib.sym("nvrtcGetProgramLogSize")?;
    let get_log: FnGet = lib.sym("nvrtcGetProgramLog")?;
    let destroy: FnDestroy = lib.sym("nvrtcDestroyProgram")?;
    let num_archs: FnNumArchs = lib.sym("nvrtcGetNumSupportedArchs")?;
    let archs_fn: FnArchs = lib.sym("nvrtcGetSupportedArchs")?;

    let want = major * 10 + minor;
    let mut n: c_int = 0;
    // SAFETY: plain out-parameter calls.
    let supported: Vec<i32> = unsafe {
        if num_archs(&mut n) != 0 || n <= 0 {
            Vec::new()
        } else {
            let mut v = vec![0 as c_int; n as usize];
            archs_fn(v.as_mut_ptr());
            v
        }
    };
    // Real SASS for the device when NVRTC knows it; else PTX of the newest arch below it.
    let (arch, cubin) = if supported.is_empty() || supported.contains(&want) {
        (format!("sm_{want}"), true)
    } else {
        let best = supported.iter().copied().filter(|a| *a <= want).max();
        match best {
            Some(a) => (format!("compute_{a}"), false),
            None => {
                return Err(nvrtc_err(format!(
                    "NVRTC supports no architecture at or below sm_{want}"
                )))
            }
        }
    };

    let src = CString::new(main).unwrap();
    let name = CString::new("sikv_kernels_all.cu").unwrap();
    let hdr_src: Vec<CString> = headers.iter().map(|(_, s)| CString::new(*s).unwrap()).collect();
    let hdr_name: Vec<CString> = headers.iter().map(|(n, _)| CString::new(*n).unwrap()).collect();
    let hs: Vec<*const c_char> = hdr_src.iter().map(|c| c.as_ptr()).collect();
    let hn: Vec<*const c_char> = hdr_name.iter().map(|c| c.as_ptr()).collect();
    let opts: Vec<CString> = [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "-default-device".into(),
    ]
    .into_iter()
    .map(|s| CString::new(s).unwrap())
    .collect();
    let op: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut prog: Prog = std::ptr::null_mut();
    // SAFETY: all pointers stay alive for the calls; prog is destroyed below.
    unsafe {
        let r = create(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            hs.len() as c_int,
            hs.as_ptr(),
            hn.as_ptr(),
        );
        if r != 0 {
            return Err(nvrtc_err(format!("nvrtcCreateProgram failed ({r})")));
        }
        let r = compile(prog, op.len() as c_int, op.as_ptr());
        if r != 0 {
            let mut sz = 0usize;
            log_size(prog, &mut sz);
            let mut log = vec![0u8; sz.max(1)];
            get_log(prog, log.as_mut_ptr() as *mut c_char);
            destroy(&mut prog);
            let log = CStr::from_bytes_until_nul(&log)
                .map(|c| c.to_string_lossy().to_string())
                .unwrap_or_default();
            return Err(nvrtc_err(format!(
                "nvrtcCompileProgram failed for {arch} ({r}):\n{log}"
            )));
        }
        let (size_sym, get_sym) = if cubin {
            ("nvrtcGetCUBINSize", "nvrtcGetCUBIN")
        } else {
            ("nvrtcGetPTXSize", "nvrtcGetPTX")
        };
        let size_fn: FnSize = lib.sym(size_sym)?;
        let get_fn: FnGet = lib.sym(get_sym)?;
        let mut sz = 0usize;
        if size_fn(prog, &mut sz) != 0 {
            destroy(&mut prog);
            return Err(nvrtc_err(format!("{size_sym} failed")));
        }
        let mut image = vec![0u8; sz + 1];
        if get_fn(prog, image.as_mut_ptr() as *mut c_char) != 0 {
            destroy(&mut prog);
            return Err(nvrtc_err(format!("{get_sym} failed")));
        }
        destroy(&mut prog);
        Ok((image, format!("nvrtc:{arch}")))
    }
}
