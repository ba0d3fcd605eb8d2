//! `install`: writes a kernelspec under its own name (never the `rust` of evcxr_jupyter).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;

pub const DEFAULT_NAME: &str = "diffexplainer-rust";

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

/// Writes `<data dir>/kernels/<name>/kernel.json`; returns the kernel directory.
pub fn install(location: &Location, name: &str, display_name: &str) -> Result<PathBuf> {
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
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe()?.canonicalize()?;
    let kernel_json = json!({
        "argv": [exe.to_string_lossy(), "run", "--connection-file", "{connection_file}"],
        "display_name": display_name,
        "language": "rust",
        "interrupt_mode": "message",
        "metadata": {"implementation": "diffexplainer-kernel"},
    });
    std::fs::write(&spec, serde_json::to_string_pretty(&kernel_json)?)?;
    Ok(dir)
}
