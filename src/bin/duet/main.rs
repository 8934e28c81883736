//! The `duet` command: run guests on KVM and on the software CPU, and explain the host.

mod cli;
mod coverage_cmd;
mod doctor_cmd;
mod elf;
mod fuzz_cmd;
mod image;
mod run_cmd;
mod status;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use status::Status;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits with 2 on a usage error, which is duet's "difference": say it with
            // duet's own error status instead (help and version still exit 0).
            let _ = e.print();
            return if e.use_stderr() { Status::Error.into() } else { ExitCode::SUCCESS };
        }
    };
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
            Status::Error.into()
        }
    }
}
