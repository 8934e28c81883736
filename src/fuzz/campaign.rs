//! A fuzzing campaign: cases from a seed, spread over shards and threads, divergences shrunk,
//! rerun in lockstep and saved as case files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestRng, TestRunner};

use super::case::{Case, Expected, FuzzMode};
use super::check::{Checker, Verdict};
use super::exec::profile_of;
use super::gen::{realize, spec_strategy, Spec};
use super::lockstep::lockstep;
use super::profile::CaseCpuid;
use super::FuzzError;

/// What a campaign runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Modes to draw cases from.
    pub modes: Vec<FuzzMode>,
    /// Cases in the whole campaign (all shards together).
    pub cases: u64,
    /// Seed: with the shard, fixes every case.
    pub seed: u64,
    /// Stop after this long even if cases remain.
    pub time: Option<Duration>,
    /// This shard's index and the number of shards: case k belongs to shard k mod N.
    pub shard: (u64, u64),
    /// Worker threads, each with its own machines.
    pub jobs: usize,
    /// Where divergences are saved.
    pub out: Option<PathBuf>,
    /// Most instructions per program.
    pub max_insns: usize,
    /// Wall-clock budget of one run.
    pub timeout: Duration,
    /// Run KVM when usable (else the interpreter alone: unsupported instructions and crashes only).
    pub use_kvm: bool,
    /// Most reruns spent shrinking one divergence.
    pub shrink_budget: u32,
    /// Divergences of one signature shrunk and saved; later ones are only counted.
    pub per_signature: u64,
    /// Ask the QEMU reference about cases KVM cannot decide and about every saved divergence.
    pub reference: bool,
    /// Redraw (up to 8 times) a program that contains an instruction this host's KVM is known
    /// not to decide; the case then depends on the host's limits as well as on the seed.
    pub avoid_host_limits: bool,
    /// Also save this many agreeing cases (KVM's result as expected) in `out/agree`, for a corpus.
    pub keep_agreeing: u64,
    /// Set (e.g. by a SIGINT handler) to stop the campaign: the cases in flight finish, no new
    /// one starts, and the summary says it was interrupted.
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            modes: FuzzMode::ALL.to_vec(),
            cases: 1000,
            seed: 0,
            time: None,
            shard: (0, 1),
            jobs: 1,
            out: None,
            max_insns: 16,
            timeout: Duration::from_millis(500),
            use_kvm: true,
            shrink_budget: 300,
            per_signature: 2,
            keep_agreeing: 0,
            reference: false,
            avoid_host_limits: false,
            interrupt: None,
        }
    }
}

/// A divergence found and shrunk.
#[derive(Clone, Debug)]
pub struct Found {
    /// The minimal case, with KVM's outcome as expected and the lockstep report as its note.
    pub case: Case,
    /// Where it was saved.
    pub path: Option<PathBuf>,
    /// Why it could not be saved (it still counts as a divergence).
    pub unsaved: Option<String>,
    /// The campaign case number it came from.
    pub index: u64,
}

/// What a campaign did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Cases run.
    pub cases: u64,
    /// KVM and the interpreter agreed.
    pub agree: u64,
    /// Divergences (before shrinking, one per case).
    pub diverged: u64,
    /// Divergences by signature (KVM's stop and the kinds of fields that differ).
    pub signatures: BTreeMap<String, u64>,
    /// Not decided by the hardware, by reason.
    pub undecided: BTreeMap<String, u64>,
    /// The interpreter does not implement an instruction, by mnemonic.
    pub unsupported: BTreeMap<String, u64>,
    /// Both backends hit the deadline.
    pub hung: u64,
    /// Only the interpreter ran (no KVM).
    pub interp_only: u64,
    /// Errors of the harness, with the case number.
    pub errors: Vec<String>,
    /// The divergences.
    pub found: Vec<Found>,
    /// Wall-clock time.
    pub elapsed: Duration,
    /// Whether KVM took part.
    pub kvm: bool,
    /// The campaign was interrupted ([`Config::interrupt`]) before all its cases ran.
    pub interrupted: bool,
    /// The campaign reached its time limit ([`Config::time`]) before all its cases ran.
    pub out_of_time: bool,
}

impl Summary {
    /// Counts the result of case `k`.
    pub fn record(&mut self, k: u64, result: Result<CaseResult, FuzzError>) {
        self.cases += 1;
        match result {
            Ok(CaseResult::Agree) => self.agree += 1,
            Ok(CaseResult::Found(sig, f)) => {
                self.diverged += 1;
                *self.signatures.entry(sig).or_default() += 1;
                if let Some(f) = f {
                    if let Some(why) = &f.unsaved {
                        self.errors.push(format!("case {k}: a divergence that could not be saved: {why}"));
                    }
                    self.found.push(*f);
                }
            }
            Ok(CaseResult::Undecided(why)) => *self.undecided.entry(why).or_default() += 1,
            Ok(CaseResult::Unsupported(m)) => *self.unsupported.entry(m).or_default() += 1,
            Ok(CaseResult::Hung) => self.hung += 1,
            Ok(CaseResult::InterpOnly) => self.interp_only += 1,
            Err(e) => self.errors.push(format!("case {k}: {e}")),
        }
    }
}

/// Checks that `dir` exists (creating it) and takes files, before any case runs, so a campaign
/// never finds a divergence it cannot save.
pub fn check_out_dir(dir: &std::path::Path) -> Result<(), FuzzError> {
    let io = |error| FuzzError::Io { path: dir.display().to_string(), error };
    std::fs::create_dir_all(dir).map_err(io)?;
    let probe = dir.join(format!(".duet-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(io)?;
    std::fs::remove_file(&probe).map_err(io)
}

/// The RNG of case `k` (draw `attempt`) of the campaign with `seed` (independent of shards and threads).
fn case_rng(seed: u64, k: u64, attempt: u64) -> TestRng {
    let mut x = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ attempt.wrapping_mul(0xd1b5_4a32_d192_ed03);
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// The spec of case `k` and its shrinkable tree.
pub fn case_tree(cfg: &Config, k: u64) -> Result<(FuzzMode, Box<dyn ValueTree<Value = Spec>>), FuzzError> {
    draw(cfg, k, 0)
}

/// Draw `attempt` of case `k`.
fn draw(
    cfg: &Config,
    k: u64,
    attempt: u64,
) -> Result<(FuzzMode, Box<dyn ValueTree<Value = Spec>>), FuzzError> {
    let modes = if cfg.modes.is_empty() { FuzzMode::ALL.to_vec() } else { cfg.modes.clone() };
    let mode = modes[((k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % modes.len() as u64) as usize];
    let mut runner = TestRunner::new_with_rng(PtConfig::default(), case_rng(cfg.seed, k, attempt));
    let tree = spec_strategy(mode, cfg.max_insns)
        .new_tree(&mut runner)
        .map_err(|e| FuzzError::Setup(format!("generating case {k}: {e}")))?;
    Ok((mode, Box::new(tree)))
}

/// The case numbered `k` of a campaign (what `--seed S` and the index reproduce).
pub fn case_number(cfg: &Config, k: u64) -> Result<Case, FuzzError> {
    Ok(realize(&case_tree(cfg, k)?.1.current()))
}

/// Shrinks a diverging tree: the simplest spec that still diverges, within `budget` reruns.
fn shrink(checker: &mut Checker, tree: &mut dyn ValueTree<Value = Spec>, budget: u32) -> Spec {
    let mut best = tree.current();
    let mut runs = 0;
    let mut more = tree.simplify();
    while more && runs < budget {
        runs += 1;
        let case = realize(&tree.current());
        let diverges = matches!(checker.check(&case, "shrinking"), Ok(Verdict::Diverge { .. }));
        if diverges {
            best = tree.current();
            more = tree.simplify();
        } else {
            more = tree.complicate();
        }
    }
    best
}

/// Progress as the campaign goes: cases done, divergences, elapsed.
pub type Progress<'a> = &'a mut dyn FnMut(&Summary);

/// Runs a campaign; `progress` is called after each case.
pub fn run(cfg: &Config, progress: Progress<'_>) -> Result<Summary, FuzzError> {
    let (shard, shards) = cfg.shard;
    if shards == 0 || shard >= shards {
        return Err(FuzzError::Setup(format!("shard {shard}/{shards} does not exist (use I/N with I < N)")));
    }
    if let Some(dir) = &cfg.out {
        check_out_dir(dir)?;
    }
    let interrupted = || cfg.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed));
    let start = Instant::now();
    let mine = cfg.cases / shards + u64::from(cfg.cases % shards > shard);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(u64, Result<CaseResult, FuzzError>)>();
    let mut summary =
        Summary { kvm: Checker::new(cfg.use_kvm, cfg.timeout).kvm.is_some(), ..Summary::default() };
    let seen: Seen = Arc::default();
    std::thread::scope(|s| {
        for _ in 0..cfg.jobs.max(1) {
            let (tx, next, stop, seen) = (tx.clone(), next.clone(), stop.clone(), seen.clone());
            s.spawn(move || {
                let mut checker = Checker::new(cfg.use_kvm, cfg.timeout);
                if cfg.reference {
                    checker.use_qemu();
                }
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= mine || stop.load(Ordering::Relaxed) || interrupted() {
                        break;
                    }
                    let k = j * shards + shard;
                    let r = one(cfg, &mut checker, k, &seen);
                    if tx.send((k, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (k, r) in rx {
            summary.record(k, r);
            summary.elapsed = start.elapsed();
            progress(&summary);
            if cfg.time.is_some_and(|t| start.elapsed() >= t) {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    summary.elapsed = start.elapsed();
    if summary.cases < mine {
        summary.interrupted = interrupted();
        summary.out_of_time = !summary.interrupted && stop.load(Ordering::Relaxed);
    }
    Ok(summary)
}

/// The result of one campaign case, sent to the collecting thread.
#[derive(Debug)]
pub enum CaseResult {
    /// KVM and the interpreter agree.
    Agree,
    /// A divergence: its signature, and the shrunk case unless the signature was seen enough.
    Found(String, Option<Box<Found>>),
    /// KVM cannot decide it, with the reason.
    Undecided(String),
    /// The interpreter does not implement this.
    Unsupported(String),
    /// Both backends reached the deadline.
    Hung,
    /// Only the interpreter ran.
    InterpOnly,
}

/// Generates, checks and (when it diverges) shrinks, reruns and saves case `k`.
/// Divergence signatures seen so far, shared by the workers.
type Seen = Arc<std::sync::Mutex<BTreeMap<String, u64>>>;

fn one(cfg: &Config, checker: &mut Checker, k: u64, seen: &Seen) -> Result<CaseResult, FuzzError> {
    let (_, mut tree) = case_tree(cfg, k)?;
    let mut case = realize(&tree.current());
    if cfg.avoid_host_limits {
        for attempt in 1..8 {
            if checker.known_limit(&case).is_none() {
                break;
            }
            tree = draw(cfg, k, attempt)?.1;
            case = realize(&tree.current());
        }
    }
    Ok(match checker.check(&case, &format!("case {k}"))? {
        Verdict::Agree => {
            if k < cfg.keep_agreeing {
                keep_agreeing(cfg, checker, case, k)?;
            }
            CaseResult::Agree
        }
        Verdict::Undecided { why } => {
            CaseResult::Undecided(why.lines().next().unwrap_or("").chars().take(120).collect())
        }
        Verdict::Unsupported { what } => CaseResult::Unsupported(what),
        Verdict::Hung => CaseResult::Hung,
        Verdict::InterpOnly => CaseResult::InterpOnly,
        Verdict::Diverge { kvm, diff, .. } => {
            let sig = super::judge::signature(&kvm.outcome.stop, &diff);
            let n = {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let n = seen.entry(sig.clone()).or_default();
                *n += 1;
                *n
            };
            if n > cfg.per_signature {
                return Ok(CaseResult::Found(sig, None));
            }
            let spec = shrink(checker, &mut *tree, cfg.shrink_budget);
            let mut case = realize(&spec);
            let (kvm_outcome, interp_outcome, diff) = match checker.check(&case, "minimal case")? {
                Verdict::Diverge { kvm, interp, diff } => (kvm.outcome, interp.outcome, diff),
                // Shrinking never keeps a spec that stopped diverging; keep the original if it did.
                _ => {
                    case = realize(&tree.current());
                    match checker.check(&case, "case")? {
                        Verdict::Diverge { kvm, interp, diff } => (kvm.outcome, interp.outcome, diff),
                        _ => return Ok(CaseResult::Agree),
                    }
                }
            };
            let minimal_sig = format!("{}: {}", case.mode, super::judge::signature(&kvm_outcome.stop, &diff));
            let first = {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let n = seen.entry(format!("minimal {minimal_sig}")).or_default();
                *n += 1;
                *n == 1
            };
            if !first {
                // Shrunk into a divergence already saved: count it, do not save it again.
                return Ok(CaseResult::Found(sig, None));
            }
            let report = match checker.kvm.as_mut() {
                Some(kvm) => lockstep(kvm, &mut checker.interp, &case, "minimal case")
                    .unwrap_or_else(|e| format!("lockstep rerun failed: {e}")),
                None => String::new(),
            };
            let third = checker.third_opinion(&case, &kvm_outcome, &interp_outcome);
            case.note = format!(
                "found by `duet fuzz --seed {}` as case {k}; kvm vs interp:\n{diff}\nthird opinion: {third}\n\
                 lockstep:\n{report}analysis: (to be written: which side the SDM supports, with the section)",
                cfg.seed
            );
            case.expected = Some(Expected::recorded_here(kvm_outcome));
            case.cpuid = Some(CaseCpuid::of(&profile_of(None)?));
            let mut path = cfg.out.as_ref().map(|d| d.join(format!("{}-{:x}-{k}.json", case.mode, cfg.seed)));
            // A case that cannot be saved is still a divergence: it is counted, and the reason
            // goes to the summary's errors.
            let unsaved = path.as_ref().and_then(|p| case.save(p).err()).map(|e| e.to_string());
            if unsaved.is_some() {
                path = None;
            }
            CaseResult::Found(sig, Some(Box::new(Found { case, path, unsaved, index: k })))
        }
    })
}

/// Saves an agreeing case with KVM's outcome as expected, under `out/agree`.
fn keep_agreeing(cfg: &Config, checker: &mut Checker, mut case: Case, k: u64) -> Result<(), FuzzError> {
    let (Some(dir), Some(kvm)) = (cfg.out.as_ref(), checker.kvm.as_mut()) else { return Ok(()) };
    let (p, state) = super::layout::prepare(&case, "case")?;
    let run = kvm.run(&case, &p, &state)?;
    case.note =
        format!("found by `duet fuzz --seed {}` as case {k}; KVM and the interpreter agree", cfg.seed);
    case.expected = Some(Expected::recorded_here(run.outcome));
    case.cpuid = Some(CaseCpuid::of(&profile_of(None)?));
    let dir = dir.join("agree");
    std::fs::create_dir_all(&dir).map_err(|e| FuzzError::Io { path: dir.display().to_string(), error: e })?;
    case.save(&dir.join(format!("{}-{:x}-{k}.json", case.mode, cfg.seed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_divergence_that_could_not_be_saved_still_counts() {
        let mut s = Summary::default();
        let found = Found {
            case: realize(&case_tree(&Config::default(), 0).unwrap().1.current()),
            path: None,
            unsaved: Some("out/x.json: Permission denied (os error 13)".into()),
            index: 5,
        };
        s.record(5, Ok(CaseResult::Found("sig".into(), Some(Box::new(found)))));
        s.record(6, Ok(CaseResult::Agree));
        assert_eq!((s.cases, s.diverged, s.agree, s.found.len()), (2, 1, 1, 1));
        assert_eq!(
            s.errors,
            ["case 5: a divergence that could not be saved: out/x.json: Permission denied (os error 13)"]
        );
    }

    #[test]
    fn the_out_directory_is_checked_before_any_case() {
        let file = std::env::temp_dir().join(format!("duet-out-check-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        // A directory below a plain file cannot be made: refused before the first case.
        let cfg = Config { out: Some(file.join("out")), cases: 1, use_kvm: false, ..Config::default() };
        let mut ran = 0;
        let err = run(&cfg, &mut |_| ran += 1).unwrap_err().to_string();
        std::fs::remove_file(&file).ok();
        assert!(err.starts_with(&format!("{}: ", file.join("out").display())), "{err}");
        assert_eq!(ran, 0);
    }

    #[test]
    fn an_interrupted_campaign_stops_and_says_so() {
        let flag = Arc::new(AtomicBool::new(true));
        let cfg = Config { cases: 50, use_kvm: false, interrupt: Some(flag), ..Config::default() };
        let s = run(&cfg, &mut |_| {}).unwrap();
        assert_eq!(s.cases, 0);
        assert!(s.interrupted && !s.out_of_time);
    }
}
