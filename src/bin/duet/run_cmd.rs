//! `duet run` and `duet list`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use duet::{compare, run_guest, BackendKind, RunConfig, RunReport, StopReason};

use crate::cli::{BackendArg, RunArgs};
use crate::image::{prepare, Prepared};

/// `duet list`: every fixture with its one-line summary.
pub fn list() {
    let fixtures = duet_fixtures::catalogue();
    let w = fixtures.iter().map(|f| f.name.len()).max().unwrap_or(0);
    for f in fixtures {
        println!("{:<w$}  {:<9}  {}", f.name, format!("{:?}", f.mode).to_lowercase(), f.summary);
    }
}

/// The backends `--backend` names, checked for availability with a clear error.
fn backends(arg: BackendArg) -> Result<Vec<BackendKind>> {
    let kinds = match arg {
        BackendArg::Auto => {
            let (kind, _) = duet::auto();
            return Ok(vec![kind]);
        }
        BackendArg::Kvm => vec![BackendKind::Kvm],
        BackendArg::Interp => vec![BackendKind::Interp],
        BackendArg::Both => BackendKind::ALL.to_vec(),
    };
    for k in &kinds {
        if let duet::Availability::Unavailable(why) = k.availability() {
            bail!("the {k} backend is not usable here: {why}. `--backend interp` runs the software CPU on any host.");
        }
    }
    Ok(kinds)
}

/// Exit status for one run (see `duet run --help`).
fn status(report: &RunReport) -> u8 {
    match &report.outcome.stop {
        StopReason::DebugExit { .. } => report.outcome.stop.debug_exit_code().map_or(1, |c| (c & 0xff) as u8),
        StopReason::Halted => 0,
        _ => 3,
    }
}

/// `duet run`.
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    if !(args.timeout > 0.0 && args.timeout.is_finite() && args.timeout <= 86_400.0) {
        bail!("--timeout {} is not a number of seconds between 0 and 86400", args.timeout);
    }
    let Prepared { guest, fixture } = prepare(args)?;
    let kinds = backends(args.backend)?;
    let mut reports = Vec::new();
    for kind in &kinds {
        let config = RunConfig {
            timeout: Duration::from_secs_f64(args.timeout),
            echo: kinds.len() == 1,
            ..RunConfig::default()
        };
        let report = run_guest(&*kind.create(), &guest, &config)
            .with_context(|| format!("running `{}` on {kind}", guest.name))?;
        if kinds.len() > 1 {
            print!("{}", report.console_text());
        }
        if !report.console.is_empty() && !report.console.ends_with(b"\n") {
            println!();
        }
        eprintln!("{}", report.summary());
        if let Some(f) = &fixture {
            if let Err(why) = f.expected.check(&report.outcome.stop, &report.console_text()) {
                eprintln!("[{kind}] differs from the fixture's expected outcome: {why}");
            }
        }
        if args.regs {
            println!("{}", duet::run::format_regs(&report.outcome.state));
        }
        reports.push(report);
    }
    if let [left, right] = &reports[..] {
        let diff = compare(left, right);
        print!("{diff}");
        if !diff.is_empty() {
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::from(reports.last().map_or(0, status)))
}
