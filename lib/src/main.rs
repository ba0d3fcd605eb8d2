//! `diffexplainer` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "diffexplainer",
    version,
    about = "Global explanations of image classifiers with differentiable diffusion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run parity cases (folders holding case.json, or folders of such folders) and print
    /// the max abs/rel error of every output and input gradient.
    Parity {
        /// Case folders, or folders containing case folders.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Parity { dirs } => parity(&dirs),
    }
}

fn parity(dirs: &[PathBuf]) -> anyhow::Result<()> {
    let mut cases = Vec::new();
    for dir in dirs {
        if dir.join("case.json").is_file() {
            cases.push(dir.clone());
        } else {
            let found = diffexplainer::parity::find_cases(dir)?;
            if found.is_empty() {
                anyhow::bail!("{}: no case.json here or in its subfolders", dir.display())
            }
            cases.extend(found);
        }
    }
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        match diffexplainer::parity::run_case(case) {
            Ok(report) => {
                print!("{report}");
                if report.passed() {
                    passed += 1
                } else {
                    failed += 1
                }
            }
            Err(e) => {
                println!("{} ERROR: {e:#}", case.display());
                failed += 1;
            }
        }
    }
    println!("parity: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
