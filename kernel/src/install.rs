//! `install`: a self-contained kernelspec under its own name (never the `rust` of evcxr_jupyter).
//!
//! The kernel directory holds everything the kernel needs, so moving or deleting the checkout it
//! was installed from does not break it:
//!
//! ```text
//! <data dir>/kernels/<name>/
//!     kernel.json           argv: the copy below, with `--workspace` naming the snapshot
//!     diffexplainer-kernel  a copy of the installing executable
//!     workspace/            a source snapshot of the library the kernel preloads:
//!         Cargo.toml        a workspace of `lib` alone, with the candle-core patch
//!         Cargo.lock        the checkout's (evcxr's builds resolve the same versions)
//!         lib/              the library's sources, without its tests
//!         vendor/candle-core
//! ```
//!
//! Files keep their modification times, so reinstalling unchanged sources keeps evcxr's build
//! cache fresh (cargo fingerprints path dependencies by mtime and by path: the snapshot's path
//! is fixed per kernel name, so the cache survives reinstalls). A reinstall builds the new
//! snapshot beside the old one and swaps them by renames.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::json;

pub const DEFAULT_NAME: &str = "diffexplainer-rust";
pub const EXE_NAME: &str = "diffexplainer-kernel";
/// The snapshot's directory name inside the kernel directory.
pub const WORKSPACE_DIR: &str = "workspace";

pub enum Location {
    /// `$JUPYTER_DATA_DIR`, else the user's Jupyter data dir (`~/.local/share/jupyter` on Linux).
    User,
    /// `<prefix>/share/jupyter` (a venv or conda prefix).
    Prefix(PathBuf),
    /// `sys.prefix` of the active Python (`$VIRTUAL_ENV` when set).
    SysPrefix,
}

fn data_dir(location: &Location) -> Result<PathBuf> {
    Ok(match location {
        Location::User => match std::env::var_os("JUPYTER_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                #[cfg(target_os = "macos")]
                let d = dirs::home_dir().map(|h| h.join("Library").join("Jupyter"));
                #[cfg(not(target_os = "macos"))]
                let d = dirs::data_dir().map(|d| d.join("jupyter"));
                d.context("no user data directory")?
            }
        },
        Location::Prefix(p) => p.join("share").join("jupyter"),
        Location::SysPrefix => {
            let prefix = match std::env::var_os("VIRTUAL_ENV") {
                Some(v) => PathBuf::from(v),
                None => {
                    let out = std::process::Command::new("python3")
                        .args(["-c", "import sys; print(sys.prefix)"])
                        .output()
                        .context("running python3 to find sys.prefix")?;
                    PathBuf::from(String::from_utf8(out.stdout)?.trim())
                }
            };
            prefix.join("share").join("jupyter")
        }
    })
}

/// The checkout this executable was built from (its path baked in at build time).
pub fn default_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Installs the kernel from the checkout `source`; returns the kernel directory.
pub fn install(
    location: &Location,
    name: &str,
    display_name: &str,
    source: &Path,
) -> Result<PathBuf> {
    if name == "rust" {
        bail!("refusing to install as `rust`: that name belongs to evcxr_jupyter's kernel");
    }
    let dir = data_dir(location)?.join("kernels").join(name);
    let spec = dir.join("kernel.json");
    if let Ok(existing) = std::fs::read_to_string(&spec) {
        if !existing.contains("diffexplainer-kernel") {
            bail!(
                "{} exists and is not a diffexplainer kernel; not overwriting it",
                spec.display()
            );
        }
    }
    let source = source.canonicalize().with_context(|| {
        format!(
            "{}: the checkout to install from is missing",
            source.display()
        )
    })?;
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "lib/Cargo.toml",
        "lib/src",
        "vendor/candle-core/Cargo.toml",
    ] {
        let p = source.join(needed);
        if !p.exists() {
            bail!(
                "{}: missing; {} is not a DiffExplainer checkout (pass --source DIR)",
                p.display(),
                source.display()
            );
        }
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pid = std::process::id();

    // The snapshot: built beside the old one, then swapped in.
    let workspace = dir.join(WORKSPACE_DIR);
    let staging = dir.join(format!(".{WORKSPACE_DIR}.new-{pid}"));
    let _ = std::fs::remove_dir_all(&staging);
    if let Err(e) = write_snapshot(&source, &staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let old = dir.join(format!(".{WORKSPACE_DIR}.old-{pid}"));
    if workspace.exists() {
        std::fs::rename(&workspace, &old)
            .with_context(|| format!("moving {} to {}", workspace.display(), old.display()))?;
    }
    std::fs::rename(&staging, &workspace)
        .with_context(|| format!("moving {} to {}", staging.display(), workspace.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }

    // The executable: copied, then renamed over the old one (a running kernel keeps its inode).
    let exe_src = std::env::current_exe()?.canonicalize()?;
    let exe = dir.join(EXE_NAME);
    let exe_tmp = dir.join(format!(".{EXE_NAME}.new-{pid}"));
    std::fs::copy(&exe_src, &exe_tmp)
        .with_context(|| format!("copying {} to {}", exe_src.display(), exe_tmp.display()))?;
    std::fs::rename(&exe_tmp, &exe)
        .with_context(|| format!("moving {} to {}", exe_tmp.display(), exe.display()))?;

    let kernel_json = json!({
        "argv": [
            exe.to_string_lossy(), "run",
            "--workspace", workspace.to_string_lossy(),
            "--connection-file", "{connection_file}",
        ],
        "display_name": display_name,
        "language": "rust",
        "interrupt_mode": "message",
        "metadata": {"implementation": "diffexplainer-kernel"},
    });
    let spec_tmp = dir.join(format!(".kernel.json.new-{pid}"));
    std::fs::write(&spec_tmp, serde_json::to_string_pretty(&kernel_json)?)
        .with_context(|| format!("writing {}", spec_tmp.display()))?;
    std::fs::rename(&spec_tmp, &spec).with_context(|| format!("writing {}", spec.display()))?;
    Ok(dir)
}

/// Writes the library's source snapshot of checkout `source` into `dest` (a new directory).
fn write_snapshot(source: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let manifest = source.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let snapshot_manifest = workspace_manifest(&text).with_context(|| {
        format!(
            "{}: not the workspace manifest expected",
            manifest.display()
        )
    })?;
    std::fs::write(dest.join("Cargo.toml"), snapshot_manifest)
        .with_context(|| format!("writing {}", dest.join("Cargo.toml").display()))?;
    copy_file(&source.join("Cargo.lock"), &dest.join("Cargo.lock"))?;
    // lib/tests links to the checkout's tests/ (fixtures, parity data): not needed to preload.
    copy_tree(&source.join("lib"), &dest.join("lib"), &|p| {
        p == source.join("lib").join("tests")
    })?;
    copy_tree(
        &source.join("vendor").join("candle-core"),
        &dest.join("vendor").join("candle-core"),
        &|p| p.file_name().is_some_and(|n| n == "target"),
    )
}

/// The checkout's root manifest reduced to a workspace of `lib` alone: the kernel and the
/// vendored evcxr are not in the snapshot, the shared `[workspace.*]` tables and the candle-core
/// patch are kept.
fn workspace_manifest(text: &str) -> Result<String> {
    let mut doc: toml::Table = toml::from_str(text)?;
    let ws = doc
        .get_mut("workspace")
        .and_then(|w| w.as_table_mut())
        .context("no [workspace] table")?;
    ws.insert("members".into(), toml::Value::Array(vec!["lib".into()]));
    ws.remove("default-members");
    if let Some(patch) = doc
        .get_mut("patch")
        .and_then(|p| p.get_mut("crates-io"))
        .and_then(|p| p.as_table_mut())
    {
        patch.retain(|k, _| k == "candle-core");
    }
    Ok(format!(
        "# Written by `diffexplainer-kernel install`: the library the kernel preloads.\n{}",
        toml::to_string(&doc)?
    ))
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    std::fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    // Keep the mtime: cargo compares it with its fingerprints (a copy would look edited).
    let mtime = std::fs::metadata(src)?.modified()?;
    std::fs::File::options()
        .write(true)
        .open(dst)
        .and_then(|f| f.set_modified(mtime))
        .with_context(|| format!("setting the mtime of {}", dst.display()))
}

/// Copies regular files and directories below `src` (symlinks are skipped), except `skip`.
fn copy_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let path = entry.path();
        if skip(&path) {
            continue;
        }
        let kind = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&path, &to, skip)?;
        } else if kind.is_file() {
            copy_file(&path, &to)?;
        }
    }
    Ok(())
}
