//! Running a guest with duet's standard devices and comparing two runs.

use std::sync::Arc;
use std::time::Duration;

use duet_core::{
    Backend, CpuidProfile, DiffMask, Guest, GuestMemory, Machine, MachineError, RunOptions, RunOutcome,
    StateDiff,
};
use duet_devices::StandardDevices;

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
    /// Bytes the guest wrote to the serial port and the debug console.
    pub console: Vec<u8>,
    /// The last POST code written to port 0x80.
    pub post_code: Option<u8>,
    /// Guest memory at the end of the run.
    pub memory: Arc<GuestMemory>,
    /// Guest RAM size (the range compared by [`compare`]).
    pub ram_size: u64,
}

impl RunReport {
    /// Console output as text (lossy UTF-8).
    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&self.console).into_owned()
    }

    /// The one-line summary the CLI prints at the end of a run.
    pub fn summary(&self) -> String {
        let o = &self.outcome;
        let mut s = format!("[{}] {}", o.backend, o.stop);
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
    Ok(RunReport {
        outcome: run.outcome,
        console: run.console,
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
    let outcome = machine.run(&RunOptions { timeout: config.timeout })?;
    Ok(RunReport {
        outcome,
        console: devices.console().contents(),
        post_code: devices.post_code(),
        memory: machine.memory().clone(),
        ram_size: guest.ram_size,
    })
}

/// Compares two runs: terminal event, console, final registers and all of guest RAM.
///
/// Only RFLAGS bits that either backend reports as architecturally undefined are masked.
pub fn compare(left: &RunReport, right: &RunReport) -> StateDiff {
    let mask = DiffMask {
        rflags_undefined: left.outcome.undefined_rflags | right.outcome.undefined_rflags,
        ignore_fpu: false,
    };
    let (ln, rn) = (left.outcome.backend, right.outcome.backend);
    let mut diff = StateDiff::states((ln, &left.outcome.state), (rn, &right.outcome.state), &mask);
    let row = |field: &str, l: String, r: String| duet_core::diff::DiffRow {
        field: field.into(),
        left: l,
        right: r,
    };
    if left.outcome.stop != right.outcome.stop {
        diff.rows.insert(0, row("stop", left.outcome.stop.to_string(), right.outcome.stop.to_string()));
    }
    if left.console != right.console {
        diff.rows.insert(
            0,
            row("console", format!("{:?}", left.console_text()), format!("{:?}", right.console_text())),
        );
    }
    diff.memory(&left.memory, &right.memory, 0, left.ram_size.min(right.ram_size));
    diff
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
