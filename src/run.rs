//! Running a guest with duet's standard devices and comparing two runs.

use std::sync::Arc;
use std::time::Duration;

use duet_core::state::rflags;
use duet_core::{
    Backend, CpuState, CpuidProfile, DiffMask, Guest, GuestMemory, Machine, MachineError, RunOptions,
    RunOutcome, StateDiff, StopReason,
};
use duet_devices::{ConsoleDigest, StandardDevices};

/// How to run a guest.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Wall-clock budget of the run.
    pub timeout: Duration,
    /// Stream the guest's console output to stdout while it runs.
    pub echo: bool,
    /// The CPUID profile the guest sees (default: [`crate::backends::shared_cpuid_profile`]).
    pub cpuid: CpuidProfile,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            timeout: Duration::from_secs(10),
            echo: false,
            cpuid: crate::backends::shared_cpuid_profile(),
        }
    }
}

/// Everything a run produced: how it ended, the final state, console output and memory.
#[derive(Clone)]
pub struct RunReport {
    /// Terminal event, final CPU state, counts and time.
    pub outcome: RunOutcome,
    /// The last bytes the guest wrote to the serial port and the debug console (at most
    /// [`duet_devices::CONSOLE_TAIL`]: output is streamed, not kept).
    pub console: Vec<u8>,
    /// The length and hash of everything the guest wrote there.
    pub console_digest: ConsoleDigest,
    /// The last POST code written to port 0x80.
    pub post_code: Option<u8>,
    /// Guest memory at the end of the run.
    pub memory: Arc<GuestMemory>,
    /// Guest RAM size (the range compared by [`compare`]).
    pub ram_size: u64,
}

impl RunReport {
    /// Console output as text (lossy UTF-8): its last [`duet_devices::CONSOLE_TAIL`] bytes.
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }

    /// How the run ended, in words: the stop reason, and for a HLT with IF = 1 that nothing
    /// can ever interrupt (duet has no timer yet), that it waits for an interrupt in vain.
    pub fn ending(&self) -> String {
        let o = &self.outcome;
        if waits_forever(&o.stop, &o.state) {
            "halted with interrupts enabled and no interrupt source".into()
        } else {
            o.stop.to_string()
        }
    }

    /// The one-line summary the CLI prints at the end of a run.
    pub fn summary(&self) -> String {
        let o = &self.outcome;
        let mut s = format!("[{}] {}", o.backend, self.ending());
        if let Some(n) = o.instructions {
            s += &format!(", {n} instructions");
        }
        s += &format!(", {} exits, {:.3} ms", o.exits, o.wall.as_secs_f64() * 1e3);
        if let Some(p) = self.post_code {
            s += &format!(", POST code {p:#04x}");
        }
        s
    }
}

impl std::fmt::Debug for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunReport")
            .field("outcome", &self.outcome)
            .field("console", &self.console_text())
            .field("post_code", &self.post_code)
            .finish_non_exhaustive()
    }
}

/// An error running a guest: the machine or its devices could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Creating or running the machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Attaching the standard devices failed.
    #[error(transparent)]
    Devices(#[from] duet_devices::DeviceError),
    /// The QEMU reference could not run the guest.
    #[error("QEMU reference: {0}")]
    Qemu(#[from] duet_qemu::QemuError),
}

/// Runs `guest` under the QEMU TCG reference (a third opinion, not a [`Backend`]).
///
/// The report has the same shape as a backend's; `notes` from duet-qemu (where its final
/// state is not exact) are printed to stderr.
pub fn run_qemu(guest: &Guest, config: &RunConfig) -> Result<RunReport, RunError> {
    let run = duet_qemu::run(guest, &config.cpuid, config.timeout)?;
    for note in &run.notes {
        eprintln!("[qemu] note: {note}");
    }
    if config.echo {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&run.console);
        let _ = out.flush();
    }
    // The digest covers everything QEMU printed; the report keeps the tail, as a backend's does.
    let console_digest = ConsoleDigest::of(&run.console);
    let mut console = run.console;
    console.drain(..console.len().saturating_sub(duet_devices::CONSOLE_TAIL));
    Ok(RunReport {
        outcome: run.outcome,
        console_digest,
        console,
        post_code: run.post_code,
        memory: run.memory,
        ram_size: run.ram_size,
    })
}

/// Builds `guest` on `backend`, attaches the standard devices and runs it to a terminal event.
pub fn run_guest(backend: &dyn Backend, guest: &Guest, config: &RunConfig) -> Result<RunReport, RunError> {
    let mut machine = Machine::new(backend, guest, &config.cpuid)?;
    let interrupts = machine.interrupts().clone();
    let devices = StandardDevices::attach(&mut machine.pio, &mut machine.mmio, &interrupts, config.echo)?;
    let outcome = machine.run(&RunOptions { timeout: config.timeout });
    devices.console().flush();
    let outcome = outcome?;
    Ok(RunReport {
        outcome,
        console: devices.console().contents(),
        console_digest: devices.console().digest(),
        post_code: devices.post_code(),
        memory: machine.memory().clone(),
        ram_size: guest.ram_size,
    })
}

/// Whether a run that stopped at HLT waits for an interrupt that cannot come: IF = 1, and the
/// run loop found nothing pending (SDM Vol. 2A HLT: only an interrupt, NMI, SMI or reset
/// resumes). duet has no timer yet, so such a guest sleeps for ever.
pub fn waits_forever(stop: &StopReason, state: &CpuState) -> bool {
    *stop == StopReason::Halted && state.regs.rflags & rflags::IF != 0
}

/// What a run's end says about its final state: whether there is a result to compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// The guest stopped by itself (debug exit, HLT, a reported exception, a debug event):
    /// registers, memory and console are its result.
    Result,
    /// The guest shut down (triple fault): memory and console are a result, the registers are
    /// not (what a CPU leaves in them on shutdown is not architectural).
    Shutdown,
    /// The run did not finish (deadline) or could not go on (an instruction one CPU does not
    /// implement or cannot run, a fetch from no RAM): nothing but how it stopped is a result.
    NoResult,
}

impl Standing {
    /// The standing of a run that ended with `stop`.
    pub fn of(stop: &StopReason) -> Standing {
        match stop {
            StopReason::DebugExit { .. }
            | StopReason::Halted
            | StopReason::Exception(_)
            | StopReason::Debug(_) => Standing::Result,
            StopReason::Shutdown => Standing::Shutdown,
            StopReason::Deadline
            | StopReason::Unsupported(_)
            | StopReason::CannotRun(_)
            | StopReason::UnbackedFetch { .. } => Standing::NoResult,
        }
    }
}

/// Compares two runs: terminal event, console, and as far as both runs have a result (see
/// [`Standing`]) the final registers and all of guest RAM.
///
/// Only RFLAGS bits that either backend reports as architecturally undefined are masked.
pub fn compare(left: &RunReport, right: &RunReport) -> StateDiff {
    compare_at_most(left, right, usize::MAX).0
}

/// [`compare`], keeping at most `max_rows` rows; also returns how many differing memory words
/// were left out. Memory is read a chunk at a time, so no whole-RAM copy is made.
pub fn compare_at_most(left: &RunReport, right: &RunReport, max_rows: usize) -> (StateDiff, u64) {
    let mask = DiffMask {
        rflags_undefined: left.outcome.undefined_rflags | right.outcome.undefined_rflags,
        ignore_fpu: false,
    };
    let (ln, rn) = (left.outcome.backend, right.outcome.backend);
    let (ls, rs) = (Standing::of(&left.outcome.stop), Standing::of(&right.outcome.stop));
    let mut diff = if ls == Standing::Result && rs == Standing::Result {
        StateDiff::states((ln, &left.outcome.state), (rn, &right.outcome.state), &mask)
    } else {
        StateDiff { sides: (ln.into(), rn.into()), rows: Vec::new() }
    };
    let row = |field: &str, l: String, r: String| duet_core::diff::DiffRow {
        field: field.into(),
        left: l,
        right: r,
    };
    if left.outcome.stop != right.outcome.stop {
        diff.rows.insert(0, row("stop", left.outcome.stop.to_string(), right.outcome.stop.to_string()));
    }
    if left.console_digest != right.console_digest {
        let shown = |r: &RunReport| {
            let cut = if r.console_digest.len > r.console.len() as u64 { "…" } else { "" };
            format!("{cut}{:?} ({} bytes)", r.console_text(), r.console_digest.len)
        };
        diff.rows.insert(0, row("console", shown(left), shown(right)));
    }
    let mut omitted = 0;
    if ls != Standing::NoResult && rs != Standing::NoResult {
        let len = left.ram_size.min(right.ram_size);
        omitted = diff.memory_at_most(&left.memory, &right.memory, 0, len, max_rows);
    }
    (diff, omitted)
}

/// The final registers as a readable block: GPRs, RIP/RFLAGS, segments, control registers.
pub fn format_regs(s: &duet_core::CpuState) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let g = s.regs.gprs();
    for (i, (name, v)) in duet_core::Regs::GPR_NAMES.iter().zip(g).enumerate() {
        let sep = if i % 4 == 3 { "\n" } else { "  " };
        let _ = write!(out, "{name:>3}={v:016x}{sep}");
    }
    let _ = writeln!(
        out,
        "rip={:016x}  rflags={:08x}  mode={:?}  cpl={}",
        s.regs.rip,
        s.regs.rflags,
        s.mode(),
        s.cpl()
    );
    for (name, seg) in s.sregs.segments() {
        let _ = writeln!(
            out,
            "{name}={:04x} base={:016x} limit={:08x} attr={:05x}",
            seg.selector,
            seg.base,
            seg.limit,
            seg.attributes()
        );
    }
    let r = &s.sregs;
    let _ = writeln!(
        out,
        "gdtr={:016x}/{:04x}  idtr={:016x}/{:04x}",
        r.gdt.base, r.gdt.limit, r.idt.base, r.idt.limit
    );
    let _ = write!(
        out,
        "cr0={:08x} cr2={:016x} cr3={:016x} cr4={:08x} efer={:x}",
        r.cr0, r.cr2, r.cr3, r.cr4, r.efer
    );
    out
}

#[cfg(test)]
mod tests {
    use duet_core::vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// A report of `backend` ending in `stop` with RAX = `rax` over 1 MiB of RAM whose first
    /// `filled` bytes hold `fill`.
    fn report(backend: &'static str, stop: StopReason, rax: u64, filled: usize, fill: u8) -> RunReport {
        let mut state = CpuState::reset();
        state.regs.rax = rax;
        let memory = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        memory.write_slice(&vec![fill; filled], GuestAddress(0)).unwrap();
        RunReport {
            outcome: RunOutcome {
                backend,
                stop,
                state,
                exits: 0,
                instructions: None,
                wall: Duration::ZERO,
                undefined_rflags: 0,
            },
            console: Vec::new(),
            console_digest: ConsoleDigest::of(b""),
            post_code: None,
            memory,
            ram_size: 1 << 20,
        }
    }

    #[test]
    fn compare_keeps_the_first_rows_and_counts_the_rest() {
        let a = report("kvm", StopReason::Halted, 1, 0x1000, 0xaa);
        let b = report("interp", StopReason::Halted, 2, 0x1000, 0x55);
        let (diff, omitted) = compare_at_most(&a, &b, 10);
        let fields: Vec<&str> = diff.rows.iter().map(|r| r.field.as_str()).collect();
        assert_eq!(fields[..2], ["rax", "mem[0x0]"]);
        assert_eq!((diff.rows.len(), omitted), (10, 0x1000 / 8 - 9));
        assert_eq!(compare(&a, &b).rows.len(), 1 + 0x1000 / 8);
    }

    #[test]
    fn registers_after_a_shutdown_are_not_compared_but_memory_is() {
        let a = report("kvm", StopReason::Shutdown, 1, 8, 1);
        let b = report("interp", StopReason::Shutdown, 2, 8, 1);
        assert!(compare(&a, &b).is_empty(), "{}", compare(&a, &b));
        let c = report("interp", StopReason::Shutdown, 2, 8, 2);
        let fields: Vec<String> = compare(&a, &c).rows.into_iter().map(|r| r.field).collect();
        assert_eq!(fields, ["mem[0x0]"]);
        // Against a run that ended by itself, the stop differs and the registers still say nothing.
        let d = report("interp", StopReason::Halted, 2, 8, 1);
        let fields: Vec<String> = compare(&a, &d).rows.into_iter().map(|r| r.field).collect();
        assert_eq!(fields, ["stop"]);
    }

    #[test]
    fn a_run_without_a_result_compares_only_how_it_stopped() {
        let a = report("kvm", StopReason::Deadline, 1, 8, 1);
        let b = report("interp", StopReason::Deadline, 2, 0x100, 2);
        assert!(compare(&a, &b).is_empty());
        assert_eq!(Standing::of(&StopReason::Deadline), Standing::NoResult);
        assert_eq!(Standing::of(&StopReason::UnbackedFetch { addr: 0x4000_0000 }), Standing::NoResult);
        assert_eq!(Standing::of(&StopReason::DebugExit { value: 0 }), Standing::Result);
    }

    #[test]
    fn a_halt_with_interrupts_enabled_waits_for_ever() {
        let mut r = report("interp", StopReason::Halted, 0, 0, 0);
        assert_eq!(r.ending(), "halted");
        r.outcome.state.regs.rflags |= rflags::IF;
        assert_eq!(r.ending(), "halted with interrupts enabled and no interrupt source");
        r.outcome.stop = StopReason::DebugExit { value: 3 };
        assert_eq!(r.ending(), "debug exit 0x3 (exit code 7)");
    }
}
