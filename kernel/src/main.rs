//! `diffexplainer-kernel`: a Jupyter kernel (messaging protocol 5.3) for Rust, evaluating cells
//! with evcxr, with the `diffexplainer` library preloaded.
//!
//! Subcommands:
//! - `run [--workspace DIR] --connection-file FILE`: serve a notebook (what `kernel.json` runs,
//!   `--workspace` naming the installed library snapshot);
//! - `install [--user | --sys-prefix | --prefix DIR] [--name NAME] [--source CHECKOUT]`: copy the
//!   kernel and a snapshot of the library's sources into a kernelspec directory (`install`);
//! - `warm [--workspace DIR]`: compile the preloaded library into the shared build cache and print timings (CI
//!   runs it once so the first notebook cell does not pay for a cold candle build).
//!
//! The protocol front is ours (see `server`); evaluation is evcxr's `CommandContext` (vendored,
//! `vendor/evcxr`); rich output is the display frames of `diffexplainer::display` (docs/kernel.md,
//! "Output framing"). The framing and the evcxr bridge follow evcxr_jupyter 0.22 (MIT OR
//! Apache-2.0).

mod analysis;
mod history;
mod install;
mod markers;
mod server;
mod session;
mod wire;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

pub const EVCXR_VERSION: &str = "0.22.0";

const USAGE: &str = "usage:
  diffexplainer-kernel run [--workspace DIR] --connection-file FILE
  diffexplainer-kernel install [--user | --sys-prefix | --prefix DIR] [--name NAME] [--display-name TEXT] [--source CHECKOUT]
  diffexplainer-kernel warm [--workspace DIR]";

fn main() -> Result<()> {
    // In evcxr's evaluation process (this same binary, re-executed) or its rustc wrapper, this
    // call never returns.
    evcxr::runtime_hook();

    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(dir) = flag("--workspace") {
        session::use_workspace(&PathBuf::from(dir))?;
    }
    match args.first().map(String::as_str) {
        Some("run") => {
            let Some(file) = flag("--connection-file").or_else(|| flag("-f")) else {
                bail!("run: missing --connection-file\n{USAGE}");
            };
            let info = wire::ConnectionInfo::read(&PathBuf::from(file))?;
            let session = session::Session::create()?;
            server::run(info, session)
        }
        Some("install") => {
            let location = if let Some(p) = flag("--prefix") {
                install::Location::Prefix(PathBuf::from(p))
            } else if args.iter().any(|a| a == "--sys-prefix") {
                install::Location::SysPrefix
            } else {
                install::Location::User
            };
            let name = flag("--name").unwrap_or_else(|| install::DEFAULT_NAME.to_string());
            let display =
                flag("--display-name").unwrap_or_else(|| "Rust (diffexplainer)".to_string());
            let source = flag("--source")
                .map(PathBuf::from)
                .unwrap_or_else(install::default_source);
            let dir = install::install(&location, &name, &display, &source)?;
            println!(
                "Installed kernelspec `{name}` in {} (compile its library once: {} warm)",
                dir.display(),
                dir.join(install::EXE_NAME).display()
            );
            Ok(())
        }
        Some("warm") => warm(),
        _ => {
            println!("{USAGE}");
            Ok(())
        }
    }
}

/// Starts evcxr, preloads the library, evaluates a trivial cell; prints the timings.
fn warm() -> Result<()> {
    let session = session::Session::create()?;
    let t0 = Instant::now();
    let (mut ctx, _outputs) = evcxr::CommandContext::new().map_err(|e| anyhow::anyhow!("{e}"))?;
    let t_start = t0.elapsed();
    let t1 = Instant::now();
    for cmd in session.preload() {
        if let Err(e) = ctx.execute(&cmd) {
            session.cleanup();
            bail!("preload failed: {e}");
        }
    }
    let t_preload = t1.elapsed();
    let t2 = Instant::now();
    let out = ctx.execute("let t = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap(); t.sum_all().unwrap().to_scalar::<f32>().unwrap()");
    let t_lib = t2.elapsed();
    let t3 = Instant::now();
    let out2 = ctx.execute("1 + 1");
    let t_trivial = t3.elapsed();
    println!("evcxr start: {t_start:.2?}\npreload (:dep diffexplainer): {t_preload:.2?}\nfirst library cell: {t_lib:.2?} -> {:?}\ntrivial cell: {t_trivial:.2?} -> {:?}",
        out.map(|o| o.get("text/plain").map(str::to_string)).map_err(|e| e.to_string()),
        out2.map(|o| o.get("text/plain").map(str::to_string)).map_err(|e| e.to_string()));
    drop(ctx);
    session.cleanup();
    Ok(())
}
