//! Shared by the integration tests: the one seeded generator (splitmix64) and the one seed
//! variable. Every random test prints `<test>: seed = 0x… (replay with SIKV_TEST_SEED=0x…)`;
//! setting `SIKV_TEST_SEED` to that value replays it (and seeds every other test with it).
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;

use selfindexkv::cpu::{LayerMut, LayerRef};
use selfindexkv::ffi::{sikv_cache_destroy, sikv_last_error_message, SikvCache};
use selfindexkv::layout::{Layout, SIKV_NUM_PLANES};

/// The seed of one random test: `SIKV_TEST_SEED` (decimal or 0x-hex) when set, so that one
/// variable replays every test; otherwise fresh from the clock, mixed with the test name so that
/// tests started in the same nanosecond still differ. Printed in the form the replay needs
/// (cargo shows a failing test's output).
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("SIKV_TEST_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            parsed.expect("SIKV_TEST_SEED must be a decimal or 0x-hex integer")
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            let mut h = t.as_nanos() as u64 ^ 0x9E37_79B9_7F4A_7C15;
            for b in test.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01B3);
            }
            h
        }
    };
    println!("{test}: seed = {seed:#x} (replay with SIKV_TEST_SEED={seed:#x})");
    seed
}

/// splitmix64: the one generator of the tests (the C and C++ programs of `c_link` carry a copy).
pub struct Rng(pub u64);

impl Rng {
    /// The generator of test `test`, seeded by [`seed`] (which prints the replay line).
    pub fn new(test: &str) -> Rng {
        Rng(seed(test))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.unit()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn normals(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Runs a command to success (a failure panics with its status, stdout and stderr) and returns
/// its stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Whether a host tool (a compiler, cmake, pkg-config) runs here. A missing one prints the
/// counted skip line `skipped: <tool> not found (<test>)`, unless SIKV_REQUIRE_HOST_TOOLS=1
/// (CI), which makes it a failure.
pub fn host_tool(tool: &str, test: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("SIKV_REQUIRE_HOST_TOOLS").as_deref() != Ok("1"),
            "{tool} not found, and SIKV_REQUIRE_HOST_TOOLS=1 requires it ({test})"
        );
        println!("skipped: {tool} not found ({test})");
    }
    ok
}

/// The one line a GPU test prints when it returns early on a machine without a CUDA device.
/// libtest counts such a test as passed, so CI counts these lines instead (`.ci/run`).
pub fn skip_no_cuda_device(test: &str) {
    println!("skipped: no CUDA device ({test})");
}

/// `libselfindexkv.a` of the profile this test was built with. `cargo test` compiles the
/// library once with every crate type of Cargo.toml (staticlib, cdylib, rlib) in one rustc call
/// and leaves the archive in `target/<profile>/deps/` (a `cargo build` also copies it up to
/// `target/<profile>/`); the copy in `deps/` is the build this test was linked with.
pub fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/c_link-<hash>
    let deps = exe.parent().expect("test executable has no parent directory");
    let profile_dir = deps
        .parent()
        .expect("test executable is not under target/<profile>/deps");
    let candidates = [deps.join("libselfindexkv.a"), profile_dir.join("libselfindexkv.a")];
    let lib = candidates.iter().find(|p| p.is_file()).cloned();
    assert!(
        lib.is_some(),
        "libselfindexkv.a is missing from {} and {}: `cargo test` builds the staticlib crate type \
         next to the test executables",
        deps.display(),
        profile_dir.display()
    );
    lib.unwrap()
}

/// One layer's plane and state pools in host memory (zeroed), as the CPU stages take them.
#[derive(Clone, PartialEq)]
pub struct HostPools {
    pub planes: Vec<Vec<u8>>,
    pub state: Vec<u8>,
}

impl HostPools {
    pub fn new(l: &Layout) -> HostPools {
        HostPools {
            planes: (0..SIKV_NUM_PLANES).map(|p| vec![0u8; l.plane_bytes[p]]).collect(),
            state: vec![0u8; l.layer_state_bytes],
        }
    }
    pub fn layer_mut(&mut self) -> LayerMut<'_> {
        let mut it = self.planes.iter_mut();
        LayerMut {
            planes: std::array::from_fn(|_| it.next().unwrap().as_mut_slice()),
            state: &mut self.state,
        }
    }
    pub fn layer_ref(&self) -> LayerRef<'_> {
        LayerRef {
            planes: std::array::from_fn(|p| self.planes[p].as_slice()),
            state: &self.state,
        }
    }
    pub fn rows(&self, l: &Layout, page: usize, h: usize, slot: usize) -> [&[u8]; SIKV_NUM_PLANES] {
        std::array::from_fn(|p| {
            let n = l.format.row_bytes[p];
            if n == 0 {
                &[][..]
            } else {
                let o = l.row_offset(p, page, h, slot);
                &self.planes[p][o..o + n]
            }
        })
    }
}

/// The last error message of the C ABI on this thread.
pub fn last_error() -> String {
    unsafe { std::ffi::CStr::from_ptr(sikv_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// A managed cache handle of the C ABI, destroyed on drop (also when an assertion fails).
pub struct OwnedCache(pub *mut SikvCache);

impl Drop for OwnedCache {
    fn drop(&mut self) {
        sikv_cache_destroy(self.0);
    }
}
