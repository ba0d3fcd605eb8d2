//! Where a kernel session keeps its files, and the code that preloads the library.
//!
//! evcxr compiles every cell as a crate in its tmpdir, dependencies included. We give each
//! session its own tmpdir (so concurrent kernels do not overwrite each other's sources) whose
//! `target/` is a symlink to one shared build directory, so the preloaded library and candle are
//! compiled once per machine and reused by every later kernel start (cargo's lock serializes
//! concurrent builds). The workspace's `Cargo.lock` is copied in, so evcxr's build resolves the
//! same dependency versions as the workspace.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The library crate the kernel preloads: `DIFFEXPLAINER_LIB_PATH` (which `--workspace DIR` sets
/// to `DIR/lib`), else the snapshot installed beside this executable (`install`), else the
/// checkout it was built from (its path baked in at build time).
pub fn lib_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DIFFEXPLAINER_LIB_PATH") {
        return PathBuf::from(p);
    }
    let installed = std::env::current_exe().ok().and_then(|exe| {
        let lib = exe
            .parent()?
            .join(crate::install::WORKSPACE_DIR)
            .join("lib");
        lib.join("Cargo.toml").exists().then_some(lib)
    });
    installed.unwrap_or_else(|| crate::install::default_source().join("lib"))
}

/// `--workspace DIR`: preload the library of the snapshot (or checkout) `DIR`. Sets
/// `DIFFEXPLAINER_LIB_PATH`, so call before any thread is started.
pub fn use_workspace(dir: &Path) -> Result<()> {
    let lib = dir.join("lib");
    if !lib.join("Cargo.toml").exists() {
        anyhow::bail!(
            "--workspace {}: no lib/Cargo.toml there (reinstall the kernel: `diffexplainer-kernel install`)",
            dir.display()
        );
    }
    // Edition 2021: set_var is safe; no other thread exists yet.
    std::env::set_var("DIFFEXPLAINER_LIB_PATH", lib);
    Ok(())
}

/// The cache root: `DIFFEXPLAINER_KERNEL_CACHE`, else `~/.cache/diffexplainer-kernel`.
pub fn cache_root() -> PathBuf {
    match std::env::var_os("DIFFEXPLAINER_KERNEL_CACHE") {
        Some(p) => PathBuf::from(p),
        None => dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("diffexplainer-kernel"),
    }
}

pub struct Session {
    pub dir: PathBuf,
    pub interrupt_file: PathBuf,
}

impl Session {
    /// Creates the session directory and sets the environment evcxr and its child process read.
    /// Call before any thread is started (it sets environment variables).
    pub fn create() -> Result<Session> {
        let root = cache_root();
        let target = root.join("target");
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        let sessions = root.join("sessions");
        remove_stale_sessions(&sessions);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir = sessions.join(format!("{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, dir.join("target"))?;
        let lock = lib_path().join("..").join("Cargo.lock");
        if lock.exists() {
            let _ = std::fs::copy(&lock, dir.join("Cargo.lock"));
        }
        write_cargo_patch(&root)?;
        let interrupt_file = dir.join("interrupt");
        // Edition 2021: set_var is safe; no other thread exists yet.
        std::env::set_var("EVCXR_TMPDIR", &dir);
        std::env::set_var("DIFFEXPLAINER_KERNEL", "1");
        // Errors carry their message, not a captured backtrace (candle's `Error::bt` captures one
        // when this is 1, which evcxr would otherwise force): the vendored evcxr passes our value.
        if std::env::var_os("RUST_BACKTRACE").is_none() {
            std::env::set_var("RUST_BACKTRACE", "0");
        }
        std::env::set_var("DIFFEXPLAINER_INTERRUPT_FILE", &interrupt_file);
        // Cells link std dynamically; their RUNPATH is relative ($ORIGIN/../..), computed from
        // the real build path, which our symlinked target dir (and any tmpdir below $HOME) breaks.
        // Put the toolchain's lib dir on the loader path so dlopen finds libstd-*.so.
        if let Some(sysroot) = rustc_sysroot() {
            let mut paths = vec![sysroot.join("lib")];
            if let Some(host) = rustc_host() {
                paths.insert(
                    0,
                    sysroot.join("lib").join("rustlib").join(host).join("lib"),
                );
            }
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                paths.extend(std::env::split_paths(&old));
            }
            std::env::set_var("LD_LIBRARY_PATH", std::env::join_paths(paths)?);
        }
        Ok(Session {
            dir,
            interrupt_file,
        })
    }

    /// The cells run before the user's first one.
    pub fn preload(&self) -> Vec<String> {
        let lib = lib_path();
        let lib = lib.canonicalize().unwrap_or(lib);
        vec![format!(
            ":dep diffexplainer = {{ path = {:?} }}\n\
             :dep candle-core = \"=0.11.1\"\n\
             use diffexplainer::*;\n\
             use diffexplainer::display::{{show, show_updatable, Display, Image, Progress, interrupted}};\n\
             use diffexplainer::plot::LineChart;\n\
             use diffexplainer::explain::LiveView;\n\
             use candle_core::{{DType, Device, Tensor, D}};\n\
             diffexplainer::display::install_kernel_panic_hook();",
            lib.to_string_lossy()
        )]
    }

    pub fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The workspace's `[patch.crates-io]` for evcxr's builds: the vendored candle-core whose tensor
/// ids are unique per process. Every cell links its own copy of candle; with stock candle each
/// copy counts tensor ids from 1 and a graph spanning cells mixes up nodes (vendor/README.md).
/// Cargo merges `.cargo/config.toml` from the build dir and all its parents; evcxr rewrites the
/// one in the session dir, so this one goes in the cache root, above every session. Written
/// through a temporary file and a rename, as concurrent kernels may write it at once.
fn write_cargo_patch(dir: &Path) -> Result<()> {
    let vendored = lib_path().join("..").join("vendor").join("candle-core");
    let vendored = vendored.canonicalize().with_context(|| {
        format!(
            "{}: the vendored candle-core is missing (reinstall the kernel: `diffexplainer-kernel install`)",
            vendored.display()
        )
    })?;
    let cargo_dir = dir.join(".cargo");
    std::fs::create_dir_all(&cargo_dir)?;
    let config = format!(
        "[patch.crates-io]\ncandle-core = {{ path = {:?} }}\n",
        vendored.to_string_lossy()
    );
    let path = cargo_dir.join("config.toml");
    let tmp = cargo_dir.join(format!("config.toml.tmp-{}", std::process::id()));
    std::fs::write(&tmp, config).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// Removes session directories left by kernels that are gone (Linux: no /proc/<pid>).
fn remove_stale_sessions(sessions: &Path) {
    let Ok(entries) = std::fs::read_dir(sessions) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) {
            if Path::new("/proc").exists() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn rustc_sysroot() -> Option<PathBuf> {
    let out = std::process::Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let p = PathBuf::from(s.trim());
    p.is_dir().then_some(p)
}

fn rustc_host() -> Option<String> {
    let out = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
}

pub fn rustc_version() -> String {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        std::process::Command::new("rustc")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
            .unwrap_or_default()
    })
    .clone()
}
