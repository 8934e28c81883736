//! `duet fuzz` and `duet diff`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use duet::fuzz::campaign::{self, Config, Summary};
use duet::fuzz::check::{against_recorded, Checker, Verdict};
use duet::fuzz::lockstep::lockstep;
use duet::fuzz::{Case, FuzzMode};

use crate::status::Status;

/// Arguments of `duet fuzz`.
#[derive(Args, Debug)]
#[command(after_help = FUZZ_HELP)]
pub struct FuzzArgs {
    /// Modes to draw from: real, prot16, prot32, prot32-ring3, long64, long64-ring3, long (both
    /// 64-bit ones), protected (the three protected ones) or all; repeat or separate with commas.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub mode: Vec<String>,
    /// Cases in the whole campaign (all shards together).
    #[arg(long, default_value_t = 1000)]
    pub cases: u64,
    /// Seed; with the same seed and shard the same cases run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this many seconds even if cases remain.
    #[arg(long)]
    pub time: Option<f64>,
    /// Run only shard I of N (`I/N`, case k belongs to shard k mod N).
    #[arg(long, default_value = "0/1")]
    pub shard: String,
    /// Worker threads (at most one per core: more only wait for a core).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub jobs: u64,
    /// Directory for divergence case files (default: fuzz-out).
    #[arg(long, default_value = "fuzz-out")]
    pub out: PathBuf,
    /// Most instructions per program.
    #[arg(long, default_value_t = 16)]
    pub max_insns: usize,
    /// Run the interpreter alone, even where KVM is usable.
    #[arg(long)]
    pub interp_only: bool,
    /// Divergences of one kind (KVM's stop and the fields that differ) shrunk and saved; the rest are counted.
    #[arg(long, default_value_t = 2)]
    pub per_kind: u64,
    /// Ask the QEMU reference (qemu-system-x86_64) about cases KVM cannot decide and about each
    /// saved divergence (slow: one QEMU process per case).
    #[arg(long)]
    pub reference: bool,
    /// Redraw programs that use an instruction this host's KVM is known not to decide (more
    /// decided cases per second here; the cases then depend on the host as well as the seed).
    #[arg(long)]
    pub avoid_host_limits: bool,
    /// Also save agreeing cases among the first N (in DIR/agree), to grow a regression corpus.
    #[arg(long, default_value_t = 0)]
    pub keep_agreeing: u64,
}

const FUZZ_HELP: &str = "\
Each divergence is shrunk to a minimal program, rerun in lockstep, and saved in --out as a
JSON case file with KVM's result as the expected one; replay it with `duet diff FILE`.
Cases this host's KVM is known to get wrong are counted as `undecided`, never as divergences.
A sharded campaign: run `--shard I/N --seed S` for I in 0..N on N machines, then concatenate
the --out directories. The first SIGINT or SIGTERM lets the cases in flight finish, prints the
summary of what ran and exits with 16; a second one stops at once (case files are written
whole or not at all). Exit status: 0 no divergence, 2 divergences found (saved or not),
16 interrupted, 4 error (--out cannot be written, a harness error).";

/// Arguments of `duet diff`.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// Case files (JSON, as `duet fuzz` writes them).
    #[arg(required = true)]
    pub cases: Vec<PathBuf>,
    /// Check only the interpreter against the recorded result, even where KVM is usable.
    #[arg(long)]
    pub interp_only: bool,
    /// Record the expected result into each file instead of checking: `kvm` (this host's KVM)
    /// or `sdm` (the interpreter's result, after checking it by hand against the SDM).
    #[arg(long, value_enum)]
    pub record: Option<RecordFrom>,
}

/// Where `duet diff --record` takes the expected result from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFrom {
    /// This host's KVM (the file then names the host it was recorded on).
    Kvm,
    /// The software CPU's result, checked by hand against the SDM (or the AMD APM).
    Sdm,
}

impl RecordFrom {
    fn name(self) -> &'static str {
        match self {
            RecordFrom::Kvm => "kvm",
            RecordFrom::Sdm => "sdm",
        }
    }
}

fn modes(names: &[String]) -> Result<Vec<FuzzMode>> {
    let mut out = Vec::new();
    for n in names {
        let more: Vec<FuzzMode> = match n.as_str() {
            "all" => FuzzMode::ALL.to_vec(),
            "long" => vec![FuzzMode::Long64, FuzzMode::Long64Ring3],
            "protected" => vec![FuzzMode::Prot16, FuzzMode::Prot32, FuzzMode::Prot32Ring3],
            other => vec![other.parse().map_err(anyhow::Error::msg)?],
        };
        for m in more {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

fn shard(s: &str) -> Result<(u64, u64)> {
    let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n > 0 && i < n => Ok((i, n)),
        _ => bail!("--shard `{s}` is not I/N with 0 <= I < N (e.g. 3/8)"),
    }
}

fn line(s: &Summary, total: u64) -> String {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let undecided: u64 = s.undecided.values().sum();
    let unsupported: u64 = s.unsupported.values().sum();
    format!(
        "{}/{total} cases  {:.0} cases/s  divergences {}  undecided {undecided}  unsupported {unsupported}  hung {}",
        s.cases,
        s.cases as f64 / secs,
        s.diverged,
        s.hung
    )
}

/// `duet fuzz`.
pub fn fuzz(args: &FuzzArgs) -> Result<ExitCode> {
    let time = match args.time {
        Some(t) if !(t > 0.0 && t <= 1e9) => bail!("--time {t} is not a number of seconds between 0 and 1e9"),
        t => t.map(Duration::from_secs_f64),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = usize::try_from(args.jobs).unwrap_or(usize::MAX);
    if jobs > cores {
        eprintln!("duet fuzz: --jobs {jobs} is more than the {cores} cores here: running {cores} workers");
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    on_termination_signals(&interrupt)?;
    let cfg = Config {
        modes: modes(&args.mode)?,
        cases: args.cases,
        seed: args.seed,
        time,
        shard: shard(&args.shard)?,
        jobs: jobs.min(cores),
        out: Some(args.out.clone()),
        max_insns: args.max_insns.clamp(1, 256),
        use_kvm: !args.interp_only,
        keep_agreeing: args.keep_agreeing,
        reference: args.reference,
        avoid_host_limits: args.avoid_host_limits,
        per_signature: args.per_kind,
        interrupt: Some(interrupt),
        ..Config::default()
    };
    let mine = cfg.cases / cfg.shard.1 + u64::from(cfg.cases % cfg.shard.1 > cfg.shard.0);
    let mut last = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let summary = campaign::run(&cfg, &mut |s| {
        if last.elapsed() >= Duration::from_millis(if tty { 200 } else { 5000 }) || s.cases == mine {
            last = Instant::now();
            let end = if tty { "\r" } else { "\n" };
            eprint!("{}{end}", line(s, mine));
            let _ = std::io::stderr().flush();
        }
    })?;
    eprintln!();
    print_summary(&summary, &cfg, mine);
    Ok(campaign_status(&summary).into())
}

/// The exit status of a campaign: a divergence first (saved or not), then an interruption,
/// then an error of the harness.
fn campaign_status(s: &Summary) -> Status {
    if s.diverged > 0 {
        Status::Difference
    } else if s.interrupted {
        Status::Interrupted
    } else if !s.errors.is_empty() {
        Status::Error
    } else {
        Status::Halted
    }
}

/// Sets `flag` on the first SIGINT or SIGTERM (the campaign finishes the cases in flight and
/// prints its summary); a second one kills the QEMU references this process started (they run
/// in process groups of their own, so a terminal's Ctrl-C does not reach them) and ends the
/// process at once with the "interrupted" status.
///
/// signal-hook keeps the `sigaction` out of this crate, which forbids unsafe code: its handler
/// only writes to a pipe that a thread of ours reads. duet-kvm's deadline kicks use SIGRTMIN+4,
/// a signal of their own; a SIGINT that lands on a vCPU thread in KVM_RUN only makes KVM_RUN
/// return early, as a stale kick would.
fn on_termination_signals(flag: &Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT/SIGTERM handler")?;
    let flag = flag.clone();
    std::thread::Builder::new()
        .name("duet-signals".into())
        .spawn(move || {
            for (n, _) in signals.forever().enumerate() {
                if n == 0 {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    eprintln!(
                        "duet fuzz: interrupted: finishing the cases in flight, then the summary \
                         (interrupt again to stop at once)"
                    );
                } else {
                    eprintln!("duet fuzz: interrupted again: stopping at once, without a summary");
                    duet::qemu::process::kill_all();
                    std::process::exit(i32::from(Status::Interrupted.code()));
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn print_summary(s: &Summary, cfg: &Config, mine: u64) {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let names: Vec<&str> = cfg.modes.iter().map(|m| m.name()).collect();
    println!(
        "duet fuzz: seed {} shard {}/{} modes {} on {}",
        cfg.seed,
        cfg.shard.0,
        cfg.shard.1,
        names.join(","),
        match (s.kvm, cfg.reference) {
            (true, _) => "kvm + interp",
            (false, true) => "interp, with QEMU as the other opinion (no KVM)",
            (false, false) => "interp only (KVM not used: nothing is compared)",
        }
    );
    println!("  cases        {} in {:.1} s ({:.0} cases/s)", s.cases, secs, s.cases as f64 / secs);
    if s.interrupted {
        println!(
            "  interrupted  by SIGINT/SIGTERM after {} of {mine} cases (the cases in flight finished)",
            s.cases
        );
    }
    if s.out_of_time {
        let t = cfg.time.map_or(0.0, |t| t.as_secs_f64());
        println!("  stopped      at the --time limit of {t} s: {} of {mine} cases ran", s.cases);
    }
    println!("  agree        {}", s.agree);
    println!(
        "  divergences  {} ({} kinds; each kind's first cases are shrunk and saved)",
        s.diverged,
        s.signatures.len()
    );
    for (sig, n) in &s.signatures {
        println!("    {n:>8}  {sig}");
    }
    for f in &s.found {
        let first = f.case.note.lines().find(|l| l.starts_with("first difference")).unwrap_or("");
        let at = match (&f.path, &f.unsaved) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(why)) => format!("NOT SAVED ({why})"),
            (None, None) => "(not saved)".into(),
        };
        println!("    case {} -> {at}  {first}", f.index);
    }
    let undecided: u64 = s.undecided.values().sum();
    let by = if cfg.reference { "QEMU could not decide them either" } else { "--reference asks QEMU" };
    println!("  undecided    {undecided} (this host's KVM cannot decide these; {by})");
    for (why, n) in &s.undecided {
        println!("    {n:>8}  {why}");
    }
    let unsupported: u64 = s.unsupported.values().sum();
    println!(
        "  unsupported  {unsupported} (the interpreter stopped at an instruction it does not implement)"
    );
    for (what, n) in &s.unsupported {
        println!("    {n:>8}  {what}");
    }
    println!("  hung         {} (both backends reached the deadline)", s.hung);
    if s.interp_only > 0 {
        println!("  interp only  {} (no KVM: run, not compared)", s.interp_only);
    }
    for e in &s.errors {
        println!("  error: {e}");
    }
}

/// `duet diff`: every file is checked (or recorded), a bad one is reported and the next one
/// checked; the status says a difference first, then an error.
pub fn diff(args: &DiffArgs) -> Result<ExitCode> {
    let mut checker = Checker::new(!args.interp_only, Duration::from_secs(2));
    if let Some(why) = checker.use_qemu() {
        eprintln!("duet diff: no third opinion: the QEMU reference is not usable: {why}");
    }
    let (mut differ, mut failed) = (false, 0);
    for path in &args.cases {
        let done = match &args.record {
            Some(source) => record_one(&mut checker, path, *source).map(|()| false),
            None => diff_one(&mut checker, path),
        };
        match done {
            Ok(d) => differ |= d,
            Err(e) => {
                eprintln!("duet: error: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 && args.cases.len() > 1 {
        eprintln!("duet diff: {failed} of {} files could not be checked (see above)", args.cases.len());
    }
    Ok(if differ {
        Status::Difference
    } else if failed > 0 {
        Status::Error
    } else {
        Status::Halted
    }
    .into())
}

/// Records the expected result of the case in `path` from `source` (`kvm` or `sdm`).
fn record_one(checker: &mut Checker, path: &std::path::Path, source: RecordFrom) -> Result<()> {
    let file = path.display().to_string();
    let mut case = Case::load(path)?;
    let (p, state) = duet::fuzz::layout::prepare(&case, &file)?;
    let exec = match source {
        RecordFrom::Kvm => checker.kvm.as_mut().context("--record kvm needs a usable KVM")?,
        RecordFrom::Sdm => &mut checker.interp,
    };
    let run = exec.run(&case, &p, &state)?;
    if matches!(
        run.outcome.stop,
        duet::StopReason::Unsupported(_)
            | duet::StopReason::CannotRun(_)
            | duet::StopReason::UnbackedFetch { .. }
    ) {
        bail!("{file}: not recorded: the {} run produced no result ({})", source.name(), run.outcome.stop);
    }
    let stop = duet::fuzz::outcome::stop_text(&run.outcome.stop);
    case.expected = Some(match source {
        RecordFrom::Kvm => duet::fuzz::Expected::recorded_here(run.outcome),
        RecordFrom::Sdm => duet::fuzz::Expected::from_source(duet::fuzz::Source::Sdm, run.outcome),
    });
    // The result holds for the profile it was recorded under: name it in the file.
    let profile = duet::fuzz::exec::profile_of(case.cpuid.as_ref())?;
    case.cpuid = Some(duet::fuzz::profile::CaseCpuid::of(&profile));
    // The file is rewritten in the format this duet writes (a format-1 file gains `recorded_on`).
    case.format = duet::fuzz::case::CASE_FORMAT;
    case.save(path)?;
    println!("{file}: recorded the {} result ({stop})", source.name());
    Ok(())
}

/// Replays the case in `path` on both backends and against its recorded result; true when
/// something differs.
fn diff_one(checker: &mut Checker, path: &std::path::Path) -> Result<bool> {
    let file = path.display().to_string();
    let case = Case::load(path)?;
    let mut differ = false;
    if checker.kvm.is_some() {
        match checker.check(&case, &file).with_context(|| format!("running {file}"))? {
            Verdict::Agree => println!("{file}: kvm and interp agree"),
            Verdict::Diverge { diff, kvm, interp } => {
                differ = true;
                println!("{file}: kvm and interp differ\n{diff}");
                println!("third opinion: {}", checker.third_opinion(&case, &kvm.outcome, &interp.outcome));
                if let Some(kvm) = checker.kvm.as_mut() {
                    match lockstep(kvm, &mut checker.interp, &case, &file) {
                        Ok(r) => println!("lockstep: {r}"),
                        Err(e) => println!("lockstep rerun failed: {e}"),
                    }
                }
            }
            Verdict::Undecided { why } => println!("{file}: undecided: {why}"),
            Verdict::Unsupported { what } => println!("{file}: the interpreter does not implement {what}"),
            Verdict::Hung => println!("{file}: both backends hung"),
            Verdict::InterpOnly => {}
        }
    }
    match against_recorded(&mut checker.interp, &case, &file)? {
        None => println!("{file}: no recorded result"),
        Some(d) if d.is_empty() => {
            println!(
                "{file}: interp matches the recorded {} result",
                case.expected.as_ref().map_or("", |e| e.source.name())
            )
        }
        Some(d) => {
            differ = true;
            println!("{file}: interp differs from the recorded result\n{d}");
        }
    }
    Ok(differ)
}
