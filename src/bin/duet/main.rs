//! The `duet` command: run guests on KVM and on the software CPU, and explain the host.

mod cli;
mod coverage_cmd;
mod doctor_cmd;
mod elf;
mod fuzz_cmd;
mod image;
mod run_cmd;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or_default() {
        Command::Run(args) => run_cmd::run(&args),
        Command::List => {
            run_cmd::list();
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor(args) => doctor_cmd::doctor(&args),
        Command::Fuzz(args) => fuzz_cmd::fuzz(&args),
        Command::Diff(args) => fuzz_cmd::diff(&args),
        Command::Coverage => coverage_cmd::coverage(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("duet: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
