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
        /// Where to run: `cpu` or `cuda` (needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print one Markdown table (module kind, reference, worst errors) instead.
        #[arg(long)]
        markdown: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Parity {
            dirs,
            markdown,
            device,
        } => parity(&dirs, markdown, &device),
    }
}

fn parity(dirs: &[PathBuf], markdown: bool, device: &str) -> anyhow::Result<()> {
    let device = match device {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0)?,
        other => anyhow::bail!("unknown device `{other}` (use cpu or cuda)"),
    };
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
    if markdown {
        println!("| case | kind | reference | worst forward rel. error | worst input-gradient rel. error | result |");
        println!("|---|---|---|---|---|---|");
    }
    for case in &cases {
        match diffexplainer::parity::run_case_on(case, &device) {
            Ok(report) if markdown => {
                println!("{}", markdown_row(&report));
                if report.passed() {
                    passed += 1
                } else {
                    failed += 1
                }
            }
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

fn markdown_row(report: &diffexplainer::parity::CaseReport) -> String {
    let worst = |grad: bool| {
        report
            .comparisons
            .iter()
            .filter(|c| c.name.starts_with("grad.") == grad)
            .map(|c| c.rel)
            .fold(None, |acc: Option<f64>, r| {
                Some(acc.map_or(r, |a| a.max(r)))
            })
            .map_or("-".to_string(), |r| format!("{r:.1e}"))
    };
    let name = report
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    format!(
        "| {name} | `{}` | {} | {} | {} | {} |",
        report.kind,
        // The version suffix is the same for every case; the table's header states it once.
        report
            .reference
            .split(" (torch ")
            .next()
            .unwrap_or_default(),
        worst(false),
        worst(true),
        if report.passed() { "pass" } else { "FAIL" }
    )
}
