//! `duet run` and `duet list`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use duet::{compare, run_guest, run_qemu, BackendKind, RunConfig, RunReport, StopReason};

use crate::cli::{BackendArg, RunArgs};
use crate::image::{prepare, Prepared};

/// `duet list`: every fixture with its one-line summary.
pub fn list() {
    let fixtures = duet_fixtures::catalogue();
    let probes: Vec<_> = duet_fixtures::probes::probes().into_iter().map(|p| p.fixture).collect();
    let w = fixtures.iter().chain(&probes).map(|f| f.name.len()).max().unwrap_or(0);
    let line = |f: &duet_fixtures::Fixture| {
        println!("{:<w$}  {:<9}  {}", f.name, format!("{:?}", f.mode).to_lowercase(), f.summary)
    };
    fixtures.iter().for_each(line);
    println!("\nprobes of known KVM defects (expected results from the SDM; `duet doctor --kvm-selfcheck`):");
    probes.iter().for_each(line);
}

/// Who runs the guest: one of duet's backends, or the QEMU reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runner {
    /// A duet backend.
    Backend(BackendKind),
    /// The QEMU TCG reference.
    Qemu,
}

impl Runner {
    fn name(self) -> &'static str {
        match self {
            Runner::Backend(k) => k.name(),
            Runner::Qemu => duet::qemu::BACKEND_NAME,
        }
    }

    fn availability(self) -> duet::Availability {
        match self {
            Runner::Backend(k) => k.availability(),
            Runner::Qemu => duet::qemu::availability(),
        }
    }

    fn run(self, guest: &duet::Guest, config: &RunConfig) -> Result<RunReport> {
        Ok(match self {
            Runner::Backend(k) => run_guest(&*k.create(), guest, config)?,
            Runner::Qemu => run_qemu(guest, config)?,
        })
    }
}

/// The runners `--backend` names; an explicitly named one that is unusable is a clear error,
/// while `all` runs whichever are usable and says what it left out.
fn runners(arg: BackendArg) -> Result<Vec<Runner>> {
    let (wanted, strict) = match arg {
        BackendArg::Auto => return Ok(vec![Runner::Backend(duet::auto().0)]),
        BackendArg::Fastest => {
            let (kind, why) = duet::backends::fastest();
            eprintln!("[fastest] picks {kind}: {why}");
            return Ok(vec![Runner::Backend(kind)]);
        }
        BackendArg::Kvm => (vec![Runner::Backend(BackendKind::Kvm)], true),
        BackendArg::Interp => (vec![Runner::Backend(BackendKind::Interp)], true),
        BackendArg::Both => {
            (vec![Runner::Backend(BackendKind::Kvm), Runner::Backend(BackendKind::Interp)], true)
        }
        BackendArg::Qemu => (vec![Runner::Qemu], true),
        BackendArg::All => (
            vec![Runner::Backend(BackendKind::Kvm), Runner::Backend(BackendKind::Interp), Runner::Qemu],
            false,
        ),
    };
    let mut usable = Vec::new();
    for r in wanted {
        match r.availability() {
            duet::Availability::Available(_) => usable.push(r),
            duet::Availability::Unavailable(why) if strict => {
                let hint = match r {
                    Runner::Qemu => "install it with `apt-get install qemu-system-x86`",
                    Runner::Backend(_) => "`--backend interp` runs the software CPU on any host",
                };
                bail!("the {} backend is not usable here: {why}. {hint}.", r.name());
            }
            duet::Availability::Unavailable(why) => eprintln!("[{}] skipped: {why}", r.name()),
        }
    }
    Ok(usable)
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
    let runners = runners(args.backend)?;
    let mut reports = Vec::new();
    for runner in &runners {
        let config = RunConfig {
            timeout: Duration::from_secs_f64(args.timeout),
            echo: runners.len() == 1,
            ..RunConfig::default()
        };
        let name = runner.name();
        let report =
            runner.run(&guest, &config).with_context(|| format!("running `{}` on {name}", guest.name))?;
        if runners.len() > 1 {
            print!("{}", report.console_text());
        }
        if !report.console.is_empty() && !report.console.ends_with(b"\n") {
            println!();
        }
        eprintln!("{}", report.summary());
        if let Some(f) = &fixture {
            if let Err(why) = f.expected.check(&report.outcome.stop, &report.console_text()) {
                eprintln!("[{name}] differs from the fixture's expected outcome: {why}");
            }
        }
        if args.regs {
            println!("{}", duet::run::format_regs(&report.outcome.state));
        }
        reports.push(report);
    }
    let differ = match &reports[..] {
        [left, right] => {
            let diff = compare(left, right);
            print!("{diff}");
            !diff.is_empty()
        }
        [_, _, _, ..] => {
            let opinions = duet::opinions::Opinions::of(&reports);
            print!("{opinions}");
            !opinions.agree()
        }
        _ => false,
    };
    if differ {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::from(reports.last().map_or(0, status)))
}
