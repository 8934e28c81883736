//! The QEMU reference as the fuzzer's third opinion: a case run under QEMU TCG from the same
//! start state, its outcome in the fuzzer's comparable form.
//!
//! QEMU sees no duet devices: it logs no port or MMIO exits and its unassigned memory reads 0
//! (duet's recorder returns a pattern), so exits are not compared against it and a case that
//! reads MMIO can differ for that reason alone (the diff shows it).

use std::time::Duration;

use duet_core::vm_memory::{Bytes, GuestAddress};

use super::case::{Case, Outcome};
use super::judge::Reference;
use super::layout::{self, CODE_ADDR, DATA_ADDR, RAM_SIZE};

/// duet-qemu as a [`Reference`].
#[derive(Clone, Copy, Debug)]
pub struct QemuReference {
    /// Wall-clock budget of one QEMU run.
    pub timeout: Duration,
}

impl QemuReference {
    /// The reference when `qemu-system-x86_64` is usable here, else why not.
    pub fn available(timeout: Duration) -> Result<Self, String> {
        match duet_qemu::availability() {
            duet_core::Availability::Available(_) => Ok(QemuReference { timeout }),
            duet_core::Availability::Unavailable(why) => Err(why),
        }
    }
}

impl Reference for QemuReference {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn run(&self, case: &Case) -> Result<Outcome, String> {
        let (p, state) = layout::prepare(case, "case").map_err(|e| e.to_string())?;
        let mut guest = layout::base_guest(case.mode).map_err(|e| e.to_string())?;
        guest.load(CODE_ADDR, p.code.clone());
        guest.load(DATA_ADDR, p.data.clone());
        guest.state = state;
        let profile = super::exec::profile_of(case.cpuid.as_ref()).map_err(|e| e.to_string())?;
        let run = duet_qemu::run(&guest, &profile, self.timeout).map_err(|e| e.to_string())?;
        let mut now = vec![0u8; RAM_SIZE as usize];
        run.memory.read_slice(&mut now, GuestAddress(0)).map_err(|e| e.to_string())?;
        let base = layout::base_image(case.mode).map_err(|e| e.to_string())?;
        let memory = super::exec::memory_changes(&layout::initial_image(&base, &p), &now);
        Ok(super::exec::outcome(&run.outcome.stop, &run.outcome.state, 0, memory, Vec::new()))
    }
}
