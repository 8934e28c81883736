//! Choosing a backend: by name, the reference this host offers ([`auto`]), or the faster one
//! here, measured ([`fastest`]).

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use duet_core::{Availability, Backend, CpuidProfile, Guest, Machine, RunOptions, StopReason};
use duet_devices::StandardDevices;
use duet_interp::InterpBackend;
use duet_kvm::KvmBackend;

/// A backend by name.
///
/// Two ways to choose one for you:
/// - [`auto`] is about fidelity: KVM whenever it is usable, because the hardware is the
///   reference the software CPU is checked against; the software CPU only without KVM. This is
///   the CLI's default (`duet run --backend auto`).
/// - [`fastest`] is about speed: it runs a short calibration (the same small ALU loop on each
///   usable backend, a few milliseconds) and picks the one that retires more instructions per
///   second, saying why (`duet run --backend fastest`; `duet doctor` prints both speeds). On
///   bare metal that is KVM; on a host whose KVM emulates the guest (a nested `kvm_pvm`, for
///   one) the software CPU is often an order of magnitude faster. Use it for long runs where
///   speed matters more than having the silicon's answer (a CI lane, a big campaign on the
///   software CPU), never as the reference of a differential test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The host CPU through KVM.
    Kvm,
    /// duet's software CPU.
    Interp,
}

impl BackendKind {
    /// Every backend, hardware first.
    pub const ALL: [BackendKind; 2] = [BackendKind::Kvm, BackendKind::Interp];

    /// The short name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Interp => "interp",
        }
    }

    /// A new instance of this backend.
    pub fn create(self) -> Box<dyn Backend> {
        match self {
            BackendKind::Kvm => Box::new(KvmBackend::with_path(kvm_device())),
            BackendKind::Interp => Box::new(InterpBackend::new()),
        }
    }

    /// Whether this backend can run here, and why not.
    pub fn availability(self) -> Availability {
        self.create().availability()
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(BackendKind::Kvm),
            "interp" => Ok(BackendKind::Interp),
            other => Err(format!("unknown backend `{other}` (expected kvm or interp)")),
        }
    }
}

/// The environment variable naming another KVM device node than `/dev/kvm` (for tests of what
/// duet says when the device cannot be opened, and for hosts that put it elsewhere).
pub const KVM_DEVICE_ENV: &str = "DUET_KVM_DEVICE";

/// The KVM device node this process uses: `$DUET_KVM_DEVICE` when set, else `/dev/kvm`.
pub fn kvm_device() -> std::path::PathBuf {
    std::env::var_os(KVM_DEVICE_ENV).map_or_else(|| duet_kvm::DEFAULT_KVM_PATH.into(), Into::into)
}

/// The CPUID profile every backend applies in this process, so both CPUs present one machine.
///
/// duet's baseline (only what the software CPU implements), restricted to what this host's
/// KVM supports when KVM is usable; the host's vendor string is kept because the silicon's
/// vendor-specific behaviour (e.g. SYSCALL in compatibility mode) follows it.
pub fn shared_cpuid_profile() -> CpuidProfile {
    static PROFILE: OnceLock<CpuidProfile> = OnceLock::new();
    PROFILE
        .get_or_init(|| {
            let kvm = KvmBackend::with_path(kvm_device());
            match kvm.host_cpuid() {
                Ok(host) => CpuidProfile::baseline().restricted_to(&host),
                Err(_) => CpuidProfile::baseline(),
            }
        })
        .clone()
}

/// The backend `auto` picks, with the reason in words.
///
/// KVM when it is usable (the hardware is the reference), else the software CPU. It does not
/// look at speed: see [`fastest`] for that.
pub fn auto() -> (BackendKind, String) {
    match BackendKind::Kvm.availability() {
        Availability::Available(what) => (BackendKind::Kvm, format!("KVM is usable ({what})")),
        Availability::Unavailable(why) => {
            (BackendKind::Interp, format!("KVM is not usable ({why}); the software CPU runs everything"))
        }
    }
}

/// Iterations of the calibration loop (8 instructions each): a few milliseconds on an emulating
/// KVM (~1–2 MIPS), a fraction of one on the software CPU or on hardware KVM.
pub const CALIBRATION_ITERS: u32 = 1000;
/// Instructions in one iteration of the calibration loop.
const CALIBRATION_LOOP_LEN: u64 = 8;
/// Instructions a calibration run counts: those of the loop.
pub const CALIBRATION_INSTRUCTIONS: u64 = CALIBRATION_ITERS as u64 * CALIBRATION_LOOP_LEN;
/// Wall-clock limit of one calibration run: only a backend that cannot run the loop meets it.
const CALIBRATION_TIMEOUT: Duration = Duration::from_secs(2);

/// The calibration guest: long mode, `iters` × (add, xor, sub, shl, or, and, dec, jnz) on
/// 32-bit registers, then the debug exit.
pub fn calibration_guest(iters: u32) -> Result<Guest, duet_fixtures::FixtureError> {
    duet_fixtures::GuestBuilder::new(duet_fixtures::Mode::Long)
        .name("calibration")
        .ram_size(2 << 20)
        .code(move |a| {
            duet_fixtures::asm::alu_loop(a, iters)?;
            duet_fixtures::asm::exit(a, 0)
        })
        .build()
}

/// How fast one backend ran the calibration loop.
#[derive(Clone, Debug, PartialEq)]
pub struct Speed {
    /// The backend.
    pub kind: BackendKind,
    /// Instructions of the loop (the few around it are not counted).
    pub instructions: u64,
    /// Wall time of the faster of two runs (the first warms caches and page tables).
    pub wall: Duration,
}

impl Speed {
    /// Millions of instructions per second.
    pub fn mips(&self) -> f64 {
        self.instructions as f64 / self.wall.as_secs_f64().max(1e-9) / 1e6
    }
}

impl fmt::Display for Speed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mips = self.mips();
        let digits = if mips < 10.0 { 2 } else { 1 };
        write!(f, "{} {mips:.digits$} MIPS", self.kind)
    }
}

/// Runs the calibration loop on `backend` (machine set-up not timed) and measures it.
pub fn calibrate(kind: BackendKind, backend: &dyn Backend) -> Result<Speed, String> {
    let iters = CALIBRATION_ITERS;
    let guest = calibration_guest(iters).map_err(|e| format!("building the calibration guest: {e}"))?;
    let mut machine = Machine::new(backend, &guest, &shared_cpuid_profile()).map_err(|e| e.to_string())?;
    let interrupts = machine.interrupts().clone();
    let _devices = StandardDevices::attach(&mut machine.pio, &mut machine.mmio, &interrupts, false)
        .map_err(|e| e.to_string())?;
    let mut best: Option<Duration> = None;
    for _ in 0..2 {
        guest.load_into(machine.memory()).map_err(|e| e.to_string())?;
        machine.vcpu().set_state(&guest.state).map_err(|e| e.to_string())?;
        let outcome = machine.run(&RunOptions { timeout: CALIBRATION_TIMEOUT }).map_err(|e| e.to_string())?;
        if outcome.stop != (StopReason::DebugExit { value: 0 }) {
            return Err(format!("the calibration loop ended with {}", outcome.stop));
        }
        best = Some(best.map_or(outcome.wall, |b| b.min(outcome.wall)));
    }
    let wall = best.unwrap_or_default();
    Ok(Speed { kind, instructions: CALIBRATION_INSTRUCTIONS, wall })
}

/// What a calibration measured: each usable backend's speed, and the backends left out.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// Backends that ran the loop, in the order given.
    pub speeds: Vec<Speed>,
    /// Backends left out, with why (not usable here, or the loop failed on them).
    pub skipped: Vec<(BackendKind, String)>,
}

impl Calibration {
    /// Calibrates every backend this host offers (KVM only where it is usable).
    pub fn measure() -> Calibration {
        let backends: Vec<(BackendKind, Box<dyn Backend>)> =
            BackendKind::ALL.iter().map(|&k| (k, k.create())).collect();
        let refs: Vec<(BackendKind, &dyn Backend)> = backends.iter().map(|(k, b)| (*k, &**b)).collect();
        Calibration::of(&refs)
    }

    /// Calibrates the given backends.
    pub fn of(backends: &[(BackendKind, &dyn Backend)]) -> Calibration {
        let mut c = Calibration::default();
        for &(kind, backend) in backends {
            match backend.availability() {
                Availability::Available(_) => match calibrate(kind, backend) {
                    Ok(speed) => c.speeds.push(speed),
                    Err(why) => c.skipped.push((kind, format!("the calibration loop failed: {why}"))),
                },
                Availability::Unavailable(why) => c.skipped.push((kind, format!("not usable: {why}"))),
            }
        }
        c
    }

    /// The faster backend (the first given on a tie: hardware first in [`BackendKind::ALL`]).
    pub fn fastest(&self) -> Option<&Speed> {
        self.speeds.iter().fold(None, |best: Option<&Speed>, s| match best {
            Some(b) if b.mips() >= s.mips() => Some(b),
            _ => Some(s),
        })
    }

    /// The backend to use and why, in words: the fastest measured one, else `auto`'s choice.
    pub fn choice(&self) -> (BackendKind, String) {
        let Some(best) = self.fastest() else {
            let (kind, why) = auto();
            let failed: Vec<String> = self.skipped.iter().map(|(k, w)| format!("{k}: {w}")).collect();
            return (
                kind,
                format!("no backend ran the calibration loop ({}); as auto: {why}", failed.join("; ")),
            );
        };
        let mut parts: Vec<String> = self.speeds.iter().map(Speed::to_string).collect();
        parts.extend(self.skipped.iter().map(|(k, why)| format!("{k} {why}")));
        let mut why = format!("measured on this host: {}", parts.join(", "));
        if let Some(slowest) =
            self.speeds.iter().filter(|s| s.kind != best.kind).map(Speed::mips).reduce(f64::min)
        {
            why += &format!(" — {} is {:.1}× faster", best.kind, best.mips() / slowest.max(1e-9));
        }
        (best.kind, why)
    }
}

/// The backend `fastest` picks, with the reason in words: the one that ran a short calibration
/// loop fastest on this host ([`Calibration`]), whatever its fidelity. See [`BackendKind`].
pub fn fastest() -> (BackendKind, String) {
    Calibration::measure().choice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse_back() {
        for k in BackendKind::ALL {
            assert_eq!(k.name().parse::<BackendKind>(), Ok(k));
        }
        assert!("qemu".parse::<BackendKind>().unwrap_err().contains("qemu"));
    }

    #[test]
    fn calibration_counts_the_instructions_the_software_cpu_retires() {
        let interp = InterpBackend::new();
        let speed = calibrate(BackendKind::Interp, &interp).unwrap();
        assert_eq!(speed.instructions, u64::from(CALIBRATION_ITERS) * CALIBRATION_LOOP_LEN);
        assert_eq!(CALIBRATION_INSTRUCTIONS, 8000, "`duet run --help` says 8,000");
        // The same loop, run as a user would: the loop is all but a handful of its instructions.
        let guest = calibration_guest(CALIBRATION_ITERS).unwrap();
        let report = crate::run_guest(&interp, &guest, &crate::RunConfig::default()).unwrap();
        let retired = report.outcome.instructions.unwrap();
        assert!((speed.instructions..speed.instructions + 16).contains(&retired), "{retired}");
    }

    #[test]
    fn fastest_without_kvm_picks_the_software_cpu_and_says_why() {
        let kvm = KvmBackend::with_path("/nonexistent/duet-kvm");
        let interp = InterpBackend::new();
        let c = Calibration::of(&[(BackendKind::Kvm, &kvm), (BackendKind::Interp, &interp)]);
        assert_eq!(c.speeds.len(), 1);
        assert_eq!(c.fastest().map(|s| s.kind), Some(BackendKind::Interp));
        let (kind, why) = c.choice();
        assert_eq!(kind, BackendKind::Interp);
        assert!(why.contains("interp ") && why.contains(" MIPS"), "{why}");
        assert!(why.contains("kvm not usable: "), "{why}");
        // The reason is the device path on x86-64; elsewhere it is the host's architecture.
        #[cfg(target_arch = "x86_64")]
        assert!(why.contains("/nonexistent/duet-kvm"), "{why}");
        #[cfg(not(target_arch = "x86_64"))]
        assert!(why.contains("needs an x86-64 host"), "{why}");
    }

    #[test]
    fn fastest_picks_the_higher_speed_and_hardware_on_a_tie() {
        let speed = |kind, micros| Speed { kind, instructions: 8000, wall: Duration::from_micros(micros) };
        let mut c = Calibration {
            speeds: vec![speed(BackendKind::Kvm, 4000), speed(BackendKind::Interp, 200)],
            skipped: vec![],
        };
        let (kind, why) = c.choice();
        assert_eq!(kind, BackendKind::Interp);
        assert_eq!(why, "measured on this host: kvm 2.00 MIPS, interp 40.0 MIPS — interp is 20.0× faster");
        c.speeds[0].wall = Duration::from_micros(100);
        assert_eq!(c.choice().0, BackendKind::Kvm);
        c.speeds[0].wall = Duration::from_micros(200);
        assert_eq!(c.choice().0, BackendKind::Kvm, "a tie goes to the hardware");
    }

    #[test]
    fn fastest_with_nothing_calibrated_falls_back_to_auto() {
        let c =
            Calibration { speeds: vec![], skipped: vec![(BackendKind::Interp, "the loop failed: x".into())] };
        let (kind, why) = c.choice();
        assert_eq!(kind, auto().0);
        assert!(
            why.starts_with("no backend ran the calibration loop (interp: the loop failed: x); as auto: "),
            "{why}"
        );
    }

    #[test]
    fn interp_is_always_available_and_auto_explains_itself() {
        assert!(BackendKind::Interp.availability().is_available());
        let (kind, why) = auto();
        assert!(!why.is_empty());
        assert_eq!(kind == BackendKind::Kvm, BackendKind::Kvm.availability().is_available());
    }
}
