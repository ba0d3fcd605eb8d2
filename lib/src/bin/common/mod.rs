//! Command-line pieces the bench binaries share (`mod common;` in each; a folder without a
//! `main.rs`, so cargo does not take it for a binary).

use candle_core::{DType, Device};

/// The value after `name` (`--runs 5`), if given.
pub fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// `--device` (default cpu) and `--dtype` (default f32), parsed as the CLI parses them.
pub fn device_and_dtype(args: &[String]) -> anyhow::Result<(Device, DType)> {
    let device =
        diffexplainer::explain::record::parse_device(arg(args, "--device").unwrap_or("cpu"))?;
    let dtype = diffexplainer::explain::bundle::parse_dtype(arg(args, "--dtype").unwrap_or("f32"))?;
    Ok((device, dtype))
}
