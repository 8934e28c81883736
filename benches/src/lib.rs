//! duet criterion benchmarks: the workloads they run and the harness around them.
//!
//! The benches live in `benches/benches/*.rs`; this library holds what they share: the guest
//! workloads ([`workloads`]), a machine with duet's standard devices that is reset between runs
//! ([`Rig`]), and the raw kvm-ioctls baseline ([`raw_kvm`]) that `exit_latency` compares duet's
//! KVM backend against. Figures and the method are in docs/BENCHMARKS.md.
#![deny(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod raw_kvm;
/// The raw KVM baseline's stand-in on other hosts, whose KVM cannot run x86 guests.
#[cfg(not(target_arch = "x86_64"))]
#[path = "raw_kvm_other_arch.rs"]
pub mod raw_kvm;
pub mod workloads;

use std::time::Duration;

use duet::devices::StandardDevices;
use duet::{BackendKind, Guest, Machine, RunOutcome};
use duet_core::{MachineError, RunOptions};

/// Wall-clock budget of one benchmark run: generous, so only a hung guest hits it.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// One machine per backend with duet's standard devices, reset to a guest's start between runs.
///
/// This is how a differential runner reuses VMs: `set_state` plus `Guest::load_into` instead of
/// building a new machine (and, on KVM, a new VM) per case.
pub struct Rig {
    /// The machine.
    pub machine: Machine,
    /// The guest it was built for.
    pub guest: Guest,
    _devices: StandardDevices,
}

impl Rig {
    /// Builds `guest` on `kind` with the process-wide CPUID profile and the standard devices.
    pub fn new(kind: BackendKind, guest: &Guest) -> Result<Self, String> {
        let backend = kind.create();
        let mut machine = Machine::new(&*backend, guest, &duet::shared_cpuid_profile())
            .map_err(|e| format!("{kind}: {e}"))?;
        let devices = StandardDevices::attach_to(&mut machine, &Default::default())
            .map_err(|e| format!("{kind}: {e}"))?;
        Ok(Rig { machine, guest: guest.clone(), _devices: devices })
    }

    /// Puts the guest's images and start state back.
    pub fn reset(&mut self) -> Result<(), MachineError> {
        self.guest.load_into(self.machine.memory())?;
        self.machine.vcpu().set_state(&self.guest.state)?;
        Ok(())
    }

    /// Runs from the current state to a terminal event.
    pub fn run(&mut self) -> Result<RunOutcome, MachineError> {
        self.machine.run(&RunOptions { timeout: TIMEOUT })
    }

    /// Resets, then runs; returns the outcome and the instructions the run retired (if counted).
    pub fn reset_and_run(&mut self) -> Result<(RunOutcome, Option<u64>), MachineError> {
        self.reset()?;
        let before = self.machine.vcpu().instructions_retired();
        let outcome = self.run()?;
        let retired = outcome.instructions.zip(before).map(|(after, before)| after - before);
        Ok((outcome, retired))
    }
}

/// The backends this run measures: every available one, or those `DUET_BACKENDS` names.
pub fn backends() -> Vec<BackendKind> {
    duet::testing::select_backends()
}

/// Whether criterion runs in test mode — one quick pass per bench — as under `cargo test`,
/// which (unlike `cargo bench`) does not pass `--bench`.
pub fn test_mode() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// Runs an exit guest's batch on duet's `Vcpu` API alone, without `Machine` or the buses:
/// reads are answered with all ones, a HLT is woken by injecting
/// [`workloads::EXIT_WAKE_VECTOR`], the debug exit ends the batch. With `deadline`, the run has
/// a deadline as `Machine::run` always sets one. Returns the exits taken before the debug exit.
pub fn vcpu_batch(vcpu: &mut dyn duet::Vcpu, deadline: bool) -> Result<u64, String> {
    use duet::VcpuExit;
    if deadline {
        vcpu.set_deadline(Some(std::time::Instant::now() + TIMEOUT));
    }
    let mut exits = 0;
    let result = loop {
        let wake = match vcpu.run() {
            Ok(VcpuExit::IoOut { port: 0xf4, .. }) => break Ok(exits),
            Ok(VcpuExit::IoIn { data, .. } | VcpuExit::MmioRead { data, .. }) => {
                data.fill(0xff);
                false
            }
            Ok(VcpuExit::IoOut { .. } | VcpuExit::MmioWrite { .. }) => false,
            Ok(VcpuExit::Hlt) => true,
            Ok(other) => break Err(format!("unexpected exit {other:?}")),
            Err(e) => break Err(e.to_string()),
        };
        exits += 1;
        if wake {
            if !vcpu.ready_for_interrupt() {
                break Err("HLT with no way to wake it (IF = 0?)".into());
            }
            if let Err(e) = vcpu.inject_interrupt(workloads::EXIT_WAKE_VECTOR) {
                break Err(e.to_string());
            }
        }
    };
    vcpu.set_deadline(None);
    result
}
