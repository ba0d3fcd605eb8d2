//! File writing that never leaves a half-written file behind: write to a temporary sibling,
//! flush, then rename over the target (atomic on POSIX filesystems). An interrupted run keeps
//! every file it finished and none it did not.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Writes `path` through `write`, atomically.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|()| {
        readable_as_created(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot move into place", path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{}: write failed", path.display()))
}

/// Writes bytes to `path` atomically.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomically(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(())
    })
}

/// Some writers (the safetensors crate) create private files (0600); a model file the user
/// asked for gets the mode any new file gets (0666 less the umask), as `File::create` gives.
#[cfg(unix)]
fn readable_as_created(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let umask = umask();
    let perms = std::fs::metadata(path)?.permissions();
    let wanted = (perms.mode() & !0o777) | (0o666 & !umask);
    if perms.mode() != wanted {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn readable_as_created(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

/// The process's umask, from /proc/self/status (Linux); 022 where it cannot be read.
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Why `path` cannot be used where a file (`want_dir` false) or folder is expected: "not found",
/// or what it is instead, so a file given for a folder is not reported as missing.
pub fn why_unusable(path: &Path, want_dir: bool) -> &'static str {
    match (std::fs::metadata(path), want_dir) {
        (Err(_), _) => "not found",
        (Ok(m), false) if m.is_dir() => "is a folder, not a file",
        (Ok(_), true) => "is a file, not a folder",
        (Ok(_), false) => "is not a regular file",
    }
}
