//! Running cases on one backend with reused machines: reset memory and state, run, collect.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{
    BusDevice, CpuState, DescriptorTable, Machine, RunOptions, Segment, StopReason, WriteOutcome,
};

use super::case::{hex_bytes, Case, FuzzMode, Outcome, Parsed};
use super::layout::{self, RAM_SIZE};
use super::profile::CaseCpuid;
use super::FuzzError;
use crate::backends::{shared_cpuid_profile, BackendKind};

/// One port or MMIO access, as the run loop saw it.
type ExitLog = Arc<Mutex<Vec<String>>>;

/// Claims every port (or every address above RAM) and logs each access; port 0xF4 ends the run.
struct Recorder {
    mmio: bool,
    base: u64,
    log: ExitLog,
}

impl Recorder {
    fn push(&self, line: String) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

/// What a read from `addr` returns: a fixed pattern of the address, so data flow is visible.
pub fn read_pattern(addr: u64, i: usize) -> u8 {
    (addr.wrapping_add(i as u64) as u8) ^ 0x5a
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = self.base + offset;
        for (i, b) in data.iter_mut().enumerate() {
            *b = read_pattern(addr, i);
        }
        let kind = if self.mmio { "mmio-read" } else { "in" };
        self.push(format!("{kind} {addr:#x} {} {}", data.len(), hex_bytes(data)));
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        let addr = self.base + offset;
        let kind = if self.mmio { "mmio-write" } else { "out" };
        self.push(format!("{kind} {addr:#x} {} {}", data.len(), hex_bytes(data)));
        if !self.mmio && addr == u64::from(duet_core::layout::DEBUG_EXIT_PORT) {
            let mut v = [0u8; 4];
            for (d, s) in v.iter_mut().zip(data) {
                *d = *s;
            }
            return WriteOutcome::Exit(u32::from_le_bytes(v));
        }
        WriteOutcome::Continue
    }
}

/// A machine kept for one mode: the VM, its exit log and the pristine RAM image.
struct Slot {
    machine: Machine,
    log: ExitLog,
    base: Arc<Vec<u8>>,
}

/// Runs cases on one backend, keeping one machine per mode and resetting it between cases.
pub struct Executor {
    kind: BackendKind,
    backend: Box<dyn duet_core::Backend>,
    slots: BTreeMap<FuzzMode, Slot>,
    /// The profile the machines in `slots` were created with (`None`: the shared profile).
    cpuid: Option<CaseCpuid>,
    /// Wall-clock budget of one case.
    pub timeout: Duration,
    /// Machines created so far (a VM is rebuilt after a shutdown, a deadline or a failure).
    pub machines_created: u64,
}

/// The result of one run, with the final state kept for lockstep comparisons.
#[derive(Clone, Debug)]
pub struct Run {
    /// Comparable outcome.
    pub outcome: Outcome,
    /// The terminal event.
    pub stop: StopReason,
    /// Final CPU state.
    pub state: CpuState,
}

impl Executor {
    /// An executor on `kind`.
    pub fn new(kind: BackendKind, timeout: Duration) -> Self {
        Executor {
            kind,
            backend: kind.create(),
            slots: BTreeMap::new(),
            cpuid: None,
            timeout,
            machines_created: 0,
        }
    }

    /// The backend this executor runs on.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Switches to the CPUID profile `case` names (its machines are rebuilt when it changes).
    fn use_profile(&mut self, case: &Case) {
        if self.cpuid != case.cpuid {
            self.slots.clear();
            self.cpuid = case.cpuid.clone();
        }
    }

    fn slot(&mut self, mode: FuzzMode) -> Result<&mut Slot, FuzzError> {
        if !self.slots.contains_key(&mode) {
            let guest = layout::base_guest(mode)?;
            let base = layout::base_image(mode)?;
            let profile = profile_of(self.cpuid.as_ref())?;
            let mut machine = Machine::new(&*self.backend, &guest, &profile)
                .map_err(|e| FuzzError::Backend { backend: self.kind.name(), why: e.to_string() })?;
            let log: ExitLog = Arc::default();
            let pio = Recorder { mmio: false, base: 0, log: log.clone() };
            let mmio = Recorder { mmio: true, base: RAM_SIZE, log: log.clone() };
            let bus_err = |e: duet_core::BusError| FuzzError::Setup(e.to_string());
            machine.pio.insert(0, 0x1_0000, Arc::new(Mutex::new(pio))).map_err(bus_err)?;
            machine
                .mmio
                .insert(RAM_SIZE, u64::MAX - RAM_SIZE, Arc::new(Mutex::new(mmio)))
                .map_err(bus_err)?;
            self.machines_created += 1;
            self.slots.insert(mode, Slot { machine, log, base });
        }
        self.slots.get_mut(&mode).ok_or_else(|| FuzzError::Setup("machine vanished".into()))
    }

    /// Loads `case` into the mode's machine (memory and registers) without running it.
    pub fn load(&mut self, case: &Case, p: &Parsed, state: &CpuState) -> Result<&mut Machine, FuzzError> {
        let kind = self.kind.name();
        self.use_profile(case);
        let slot = self.slot(case.mode)?;
        let img = layout::initial_image(&slot.base, p);
        let mem = slot.machine.memory().clone();
        write_ram(&mem, &img)?;
        slot.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
        slot.machine.vcpu().set_state(state).map_err(|e| FuzzError::Backend {
            backend: kind,
            why: format!("loading the start state: {e}"),
        })?;
        Ok(&mut slot.machine)
    }

    /// Runs `case` from its start state to a terminal event.
    pub fn run(&mut self, case: &Case, p: &Parsed, state: &CpuState) -> Result<Run, FuzzError> {
        let timeout = self.timeout;
        let kind = self.kind.name();
        let machine = self.load(case, p, state)?;
        let _ = machine.vcpu().set_single_step(false);
        let result = machine.run(&RunOptions { timeout });
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                self.slots.remove(&case.mode);
                return Err(FuzzError::Backend { backend: kind, why: e.to_string() });
            }
        };
        let run = self.collect(case.mode, p, out.stop, out.state, out.undefined_rflags)?;
        if matches!(run.stop, StopReason::Shutdown | StopReason::Deadline | StopReason::CannotRun(_))
            && self.kind == BackendKind::Kvm
        {
            // A VM after a triple fault or a stuck instruction is not trusted for the next case.
            self.slots.remove(&case.mode);
        }
        Ok(run)
    }

    /// Reads the outcome of the last run of `mode` and leaves the machine's RAM pristine.
    pub fn collect(
        &mut self,
        mode: FuzzMode,
        p: &Parsed,
        stop: StopReason,
        state: CpuState,
        undefined: u64,
    ) -> Result<Run, FuzzError> {
        let slot = self.slot(mode)?;
        let mem = slot.machine.memory().clone();
        let mut now = vec![0u8; RAM_SIZE as usize];
        mem.read_slice(&mut now, GuestAddress(0)).map_err(|e| FuzzError::Setup(e.to_string()))?;
        let initial = layout::initial_image(&slot.base, p);
        let memory = memory_changes(&initial, &now);
        let exits = slot.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let outcome = outcome(&stop, &state, undefined, memory, exits);
        Ok(Run { outcome, stop, state })
    }

    /// Reads the current RAM of `mode`'s machine.
    pub fn ram(&mut self, mode: FuzzMode) -> Result<Vec<u8>, FuzzError> {
        let slot = self.slot(mode)?;
        let mut now = vec![0u8; RAM_SIZE as usize];
        slot.machine
            .memory()
            .read_slice(&mut now, GuestAddress(0))
            .map_err(|e| FuzzError::Setup(e.to_string()))?;
        Ok(now)
    }

    /// The machine of `mode` as the last case left it.
    pub fn machine(&mut self, mode: FuzzMode) -> Result<&mut Machine, FuzzError> {
        Ok(&mut self.slot(mode)?.machine)
    }

    /// Drops the machine of `mode` (the next case builds a fresh one).
    pub fn forget(&mut self, mode: FuzzMode) {
        self.slots.remove(&mode);
    }
}

/// The CPUID profile of a case: the one it names, else this process's shared profile.
pub fn profile_of(cpuid: Option<&CaseCpuid>) -> Result<duet_core::cpuid::CpuidProfile, FuzzError> {
    match cpuid {
        Some(c) => c.profile().map_err(|e| FuzzError::Setup(format!("the case's CPUID profile: {e}"))),
        None => Ok(shared_cpuid_profile()),
    }
}

/// Writes the whole RAM image (cheap next to a VM exit, and leaves nothing of the last case).
fn write_ram(mem: &duet_core::GuestMemory, img: &[u8]) -> Result<(), FuzzError> {
    mem.write_slice(img, GuestAddress(0)).map_err(|e| FuzzError::Setup(e.to_string()))
}

/// The 8-byte words of `now` that differ from `initial`, keyed by address.
pub fn memory_changes(initial: &[u8], now: &[u8]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for (i, (a, b)) in initial.chunks(4096).zip(now.chunks(4096)).enumerate() {
        if a == b {
            continue;
        }
        for (j, (x, y)) in a.chunks(8).zip(b.chunks(8)).enumerate() {
            if x != y {
                let mut w = [0u8; 8];
                w[..y.len()].copy_from_slice(y);
                m.insert(format!("{:#07x}", i * 4096 + j * 8), format!("{:#018x}", u64::from_le_bytes(w)));
            }
        }
    }
    m
}

/// How a stop reads in an outcome (stable text, comparable between backends).
pub fn stop_text(stop: &StopReason) -> String {
    match stop {
        StopReason::DebugExit { value } => format!("debug-exit {value:#x}"),
        StopReason::Exception(r) => {
            format!("exception {} error {:#x} at {:#x}", r.name(), r.error_code, r.rip)
        }
        StopReason::Halted => "halted".into(),
        StopReason::Shutdown => "shutdown".into(),
        StopReason::Debug(_) => "debug".into(),
        StopReason::Deadline => "deadline".into(),
        StopReason::Unsupported(i) => format!("unsupported {i}"),
        StopReason::CannotRun(c) => format!("cannot-run {c}"),
        StopReason::UnbackedFetch { addr } => format!("unbacked-fetch {addr:#x}"),
    }
}

fn seg_fields(m: &mut BTreeMap<String, String>, name: &str, s: &Segment, long: bool) {
    m.insert(format!("{name}.selector"), format!("{:#x}", s.selector));
    // The hidden part of a segment register holding a null selector is not architecturally
    // visible (only FS/GS bases are, in 64-bit mode); backends represent it differently.
    let null = s.selector & !3 == 0 && !matches!(name, "cs" | "tr" | "ldtr");
    if null && long && matches!(name, "fs" | "gs") {
        m.insert(format!("{name}.base"), format!("{:#x}", s.base));
    }
    if !s.unusable && !null {
        m.insert(format!("{name}.base"), format!("{:#x}", s.base));
        m.insert(format!("{name}.limit"), format!("{:#x}", s.limit));
        m.insert(format!("{name}.attributes"), format!("{:#x}", s.attributes()));
    }
}

fn table_fields(m: &mut BTreeMap<String, String>, name: &str, t: &DescriptorTable) {
    m.insert(format!("{name}.base"), format!("{:#x}", t.base));
    m.insert(format!("{name}.limit"), format!("{:#x}", t.limit));
}

/// The comparable outcome of a run.
pub fn outcome(
    stop: &StopReason,
    s: &CpuState,
    undefined: u64,
    memory: BTreeMap<String, String>,
    exits: Vec<String>,
) -> Outcome {
    let mut m = BTreeMap::new();
    for (name, v) in duet_core::Regs::GPR_NAMES.iter().zip(s.regs.gprs()) {
        m.insert(name.to_string(), format!("{v:#x}"));
    }
    m.insert("rip".into(), format!("{:#x}", s.regs.rip));
    m.insert("rflags".into(), format!("{:#x}", s.regs.rflags));
    let long = s.sregs.efer & duet_core::state::ctrl::EFER_LMA != 0;
    for (name, seg) in s.sregs.segments() {
        seg_fields(&mut m, name, seg, long);
    }
    seg_fields(&mut m, "tr", &s.sregs.tr, long);
    seg_fields(&mut m, "ldtr", &s.sregs.ldt, long);
    table_fields(&mut m, "gdtr", &s.sregs.gdt);
    table_fields(&mut m, "idtr", &s.sregs.idt);
    let r = &s.sregs;
    for (n, v) in
        [("cr0", r.cr0), ("cr2", r.cr2), ("cr3", r.cr3), ("cr4", r.cr4), ("cr8", r.cr8), ("efer", r.efer)]
    {
        m.insert(n.into(), format!("{v:#x}"));
    }
    for (k, v) in &s.msrs {
        m.insert(format!("msr[{k:#x}]"), format!("{v:#x}"));
    }
    Outcome { stop: stop_text(stop), state: m, rflags_undefined: format!("{undefined:#x}"), memory, exits }
}
