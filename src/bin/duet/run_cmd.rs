//! `duet run` and `duet list`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use duet::run::{compare_at_most, Standing};
use duet::{run_guest, run_qemu, BackendKind, RunConfig, RunReport};

use crate::cli::{BackendArg, RunArgs, DEFAULT_ROWS};
use crate::image::{prepare, Prepared};
use crate::status::{self, Status};

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
        BackendArg::Auto => {
            let (kind, why) = duet::auto();
            if kind != BackendKind::Kvm {
                // Said once, so a user who expected KVM knows why the software CPU ran.
                eprintln!("[auto] runs on {kind}: {why}");
            }
            return Ok(vec![Runner::Backend(kind)]);
        }
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
                // The backend's own explanation may already say what to do instead.
                if why.contains("--backend interp") {
                    bail!("the {} backend is not usable here: {why}", r.name());
                }
                bail!("the {} backend is not usable here: {why}; {hint}", r.name());
            }
            duet::Availability::Unavailable(why) => eprintln!("[{}] skipped: {why}", r.name()),
        }
    }
    Ok(usable)
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
        // Console output is streamed as the guest prints, on every runner, one run after another.
        let config =
            RunConfig { timeout: Duration::from_secs_f64(args.timeout), echo: true, ..RunConfig::default() };
        let name = runner.name();
        let report =
            runner.run(&guest, &config).with_context(|| format!("running `{}` on {name}", guest.name))?;
        if report.console_digest.len > 0 && !report.console.ends_with(b"\n") {
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
    let code = match &reports[..] {
        [] => Status::Error.code(),
        [one] => status::of_run(&one.outcome.stop, &one.outcome.state),
        several => compared(several, if args.all_rows { usize::MAX } else { DEFAULT_ROWS }),
    };
    Ok(ExitCode::from(code))
}

/// Compares the runs of one guest, prints what it found, and returns the exit status: a
/// difference between runs that have results, else what the runs without one did, else the
/// status the runs agree on.
fn compared(reports: &[RunReport], max_rows: usize) -> u8 {
    let (results, without): (Vec<&RunReport>, Vec<&RunReport>) =
        reports.iter().partition(|r| Standing::of(&r.outcome.stop) != Standing::NoResult);
    let (differ, omitted) = match reports {
        [left, right] if without.is_empty() => {
            let (diff, omitted) = compare_at_most(left, right, max_rows);
            // Two shutdowns that agree are said below, with what was not compared.
            if !diff.is_empty() || Standing::of(&left.outcome.stop) != Standing::Shutdown {
                print!("{diff}");
            }
            (!diff.is_empty(), omitted)
        }
        [_, _] => (false, 0),
        _ => {
            let opinions = duet::opinions::Opinions::at_most(reports, max_rows);
            print!("{opinions}");
            // Only the runs with a result can disagree; one without stands apart, said below.
            (results_differ(&results), opinions.omitted)
        }
    };
    if omitted > 0 {
        println!("… and {omitted} more differing memory words (--all-rows prints every row)");
    }
    if differ {
        return Status::Difference.code();
    }
    if without.is_empty() {
        let first = &reports[0].outcome;
        if Standing::of(&first.stop) == Standing::Shutdown {
            println!(
                "every run shut down (triple fault) with the same memory and console; the registers a CPU \
                 leaves after a shutdown are not a result and were not compared"
            );
        }
        return status::of_run(&first.stop, &first.state);
    }
    let names: Vec<&str> = without.iter().map(|r| r.outcome.backend).collect();
    println!(
        "no comparable result from {}: a run that reached its deadline or could not go on leaves no \
         state to compare",
        names.join(" and ")
    );
    let w = reports.iter().map(|r| r.outcome.backend.len()).max().unwrap_or(0) + 1;
    for r in reports {
        println!("  {:<w$} {}", format!("{}:", r.outcome.backend), r.ending());
    }
    let statuses: Vec<Status> =
        without.iter().map(|r| Status::of_stop(&r.outcome.stop, &r.outcome.state)).collect();
    match statuses.split_first() {
        Some((&first, rest)) if rest.iter().all(|&s| s == first) => first.code(),
        _ => Status::NoComparison.code(),
    }
}

/// Whether any two of `results` differ.
fn results_differ(results: &[&RunReport]) -> bool {
    results.iter().enumerate().any(|(i, a)| {
        results[i + 1..].iter().any(|b| {
            let (diff, omitted) = compare_at_most(a, b, 1);
            !diff.is_empty() || omitted > 0
        })
    })
}
