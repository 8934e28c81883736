//! Shared harness of the `isa_*` differential tests.
//!
//! A [`Batch`] is many instruction cases assembled into ONE guest (KVM here costs ~8 µs per exit,
//! so one exit per batch, not per case). Before each case the harness resets RSP, RFLAGS (to 2)
//! and zeroes RAX/RBX/RCX/RDX/RSI/RDI; the case sets its inputs and runs its instruction; then the
//! harness stores those six registers and RFLAGS — status flags and DF only, with the bits the
//! SDM leaves undefined for that case cleared in-guest — into the case's 64-byte result slot.
//!
//! [`Batch::check`] runs the guest on every selected backend, requires debug exit 0, compares
//! the slots case by case (KVM against the software CPU, naming each differing case), compares
//! the whole final state and RAM with [`duet::compare`], and checks the KVM-recorded snapshot of
//! the slots (`tests/snapshots/isa-<name>.snap`), which is what the interpreter-only run checks.
//! Each snapshot names the host it was recorded on and the CPUID profile it ran under (its
//! `info`): KVM is checked against it only on such a host, the software CPU always, under that
//! profile ([`duet::recording`]).
#![allow(dead_code, reason = "each test file uses part of the harness")]

use duet::core::vm_memory::{Bytes, GuestAddress};
use duet::fixtures::{GuestBuilder, Mode};
use duet::recording::SnapshotReplay;
use duet::{compare, run_guest, testing, BackendKind, Guest, RunConfig, RunReport, StopReason};
use iced_x86::code_asm::*;
use iced_x86::{Code, IcedError, Instruction, Register};

/// Status flags CF PF AF ZF SF OF.
pub const STATUS: u64 = 0x8d5;
/// Carry flag.
pub const CF: u64 = 1;
/// Parity flag.
pub const PF: u64 = 1 << 2;
/// Auxiliary carry flag.
pub const AF: u64 = 1 << 4;
/// Zero flag.
pub const ZF: u64 = 1 << 6;
/// Sign flag.
pub const SF: u64 = 1 << 7;
/// Direction flag.
pub const DF: u64 = 1 << 10;
/// Overflow flag.
pub const OF: u64 = 1 << 11;

/// What one case emits: inputs, the instruction(s) under test, results left in registers.
pub type Emit = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;

/// Names of the six result registers, in slot order.
pub const REGS: [&str; 6] = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi"];

/// One instruction case.
pub struct Case {
    /// Readable description (instruction and operands).
    pub label: String,
    /// RFLAGS bits the SDM leaves undefined for this case (cleared before storing).
    pub undefined: u64,
    emit: Emit,
}

/// The stored result of one case: six registers and the masked flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Slot {
    /// RAX, RBX, RCX, RDX, RSI, RDI (zero-extended in 16/32-bit modes).
    pub regs: [u64; 6],
    /// RFLAGS & (STATUS | DF) & !undefined.
    pub flags: u64,
}

impl Slot {
    /// RAX.
    pub fn rax(&self) -> u64 {
        self.regs[0]
    }
    /// RDX.
    pub fn rdx(&self) -> u64 {
        self.regs[3]
    }

    fn text(&self) -> String {
        let mut s = String::new();
        for (name, v) in REGS.iter().zip(self.regs) {
            if v != 0 {
                s += &format!(" {name}={v:x}");
            }
        }
        s + &format!(" fl={:03x}", self.flags)
    }
}

/// Bytes per result slot.
const SLOT: u64 = 64;

/// Where results go (an address usable as an absolute memory operand in the mode's code).
pub fn results_addr(mode: Mode) -> u64 {
    match mode {
        Mode::Real => 0x8000, // DS:0x8000, DS = 0x1000
        _ => 0x40_0000,
    }
}

/// A scratch data area cases may use (absolute operand in the mode's code; DS-relative in real mode).
pub fn scratch(mode: Mode) -> u64 {
    match mode {
        Mode::Real => 0x6000,
        _ => 0x50_0000,
    }
}

/// Linear address of a DS-relative offset `off` of the batch's data segment.
pub fn linear(mode: Mode, off: u64) -> u64 {
    match mode {
        Mode::Real => REAL_BASE.wrapping_add(off),
        _ => off,
    }
}

/// Real-mode code is loaded here (CS = DS = ES = FS = GS = 0x1000, IP 0).
const REAL_BASE: u64 = 0x1_0000;

/// Many cases in one guest.
pub struct Batch {
    name: String,
    mode: Mode,
    cases: Vec<Case>,
    data: Vec<(u64, Vec<u8>)>,
    patches: Vec<(u64, Vec<u8>)>,
}

impl Batch {
    /// An empty batch; `name` names the snapshot (`isa-<name>`).
    pub fn new(name: &str, mode: Mode) -> Self {
        Batch { name: name.into(), mode, cases: Vec::new(), data: Vec::new(), patches: Vec::new() }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Code size of the mode.
    pub fn bits(&self) -> u32 {
        self.mode.bitness()
    }

    /// Adds a case.
    pub fn case(
        &mut self,
        label: impl Into<String>,
        undefined: u64,
        f: impl Fn(&mut CodeAssembler) -> Result<(), IcedError> + 'static,
    ) {
        self.cases.push(Case { label: label.into(), undefined, emit: Box::new(f) });
    }

    /// Loads `bytes` at DS-relative offset `off` (a linear address outside real mode) at build time.
    pub fn data(&mut self, off: u64, bytes: impl Into<Vec<u8>>) {
        self.data.push((linear(self.mode, off), bytes.into()));
    }

    /// Like [`Batch::data`], but may replace what the guest builder places in RAM (an IDT gate…).
    pub fn patch(&mut self, off: u64, bytes: impl Into<Vec<u8>>) {
        self.patches.push((linear(self.mode, off), bytes.into()));
    }

    /// Number of cases.
    pub fn len(&self) -> usize {
        self.cases.len()
    }

    /// The labels, in order.
    pub fn labels(&self) -> Vec<String> {
        self.cases.iter().map(|c| c.label.clone()).collect()
    }

    /// Builds the guest.
    pub fn guest(self) -> (Guest, Vec<String>) {
        let mode = self.mode;
        let labels = self.labels();
        let n = self.cases.len() as u64;
        assert!(
            mode != Mode::Real || results_addr(mode) + n * SLOT <= 0x1_0000,
            "{}: too many real-mode cases ({n})",
            self.name
        );
        let cases = self.cases;
        let mut b = GuestBuilder::new(mode).name(self.name.clone());
        if mode == Mode::Real {
            b = b.load_addr(REAL_BASE);
        }
        for (addr, bytes) in self.data {
            b = b.load(addr, bytes);
        }
        for (addr, bytes) in self.patches {
            b = b.patch(addr, bytes);
        }
        let guest = b
            .code(move |a| {
                for (i, c) in cases.iter().enumerate() {
                    prologue(a, mode)?;
                    (c.emit)(a)?;
                    epilogue(a, mode, results_addr(mode) + i as u64 * SLOT, c.undefined)?;
                }
                duet::fixtures::asm::exit(a, 0)
            })
            .build()
            .unwrap_or_else(|e| panic!("cannot build the guest: {e}"));
        if mode == Mode::Real {
            // The image must not run into the scratch and result areas of its segment.
            let code_end =
                guest.loads.iter().find(|l| l.addr == REAL_BASE).map_or(0, |l| l.bytes.len() as u64);
            assert!(
                code_end <= scratch(mode),
                "real-mode code is {code_end:#x} bytes, over the scratch area"
            );
        }
        (guest, labels)
    }

    /// Runs on every selected backend and checks: debug exit 0, KVM == interpreter case by case
    /// and in the whole final state, and the KVM-recorded snapshot under the replay rules of
    /// [`duet::recording`] (KVM only on the host the snapshot was recorded on; the software CPU
    /// under the snapshot's own profile). Returns each backend's slots.
    pub fn check(self) -> Vec<(BackendKind, Vec<Slot>)> {
        let (name, mode) = (self.name.clone(), self.mode);
        let (guest, labels) = self.guest();
        let runs = differential(&name, mode, &guest, &labels);
        let snap = format!("isa-{name}");
        let kvm_ran = runs.iter().any(|(k, _)| *k == BackendKind::Kvm);
        let replay = snapshot_replay(&snap, kvm_ran);
        let description = format!("isa batch `{name}` ({mode} mode): per case, nonzero result registers and defined flags; recorded on KVM and reviewed");
        for (kind, slots) in &runs {
            let text = match (kind, &replay.interp_profile) {
                (BackendKind::Kvm, _) => match &replay.kvm {
                    Ok(()) => slots_text(&labels, slots),
                    Err(why) => {
                        eprintln!("skipped: kvm vs snapshot `{snap}`: {why}");
                        continue;
                    }
                },
                (BackendKind::Interp, None) => slots_text(&labels, slots),
                (BackendKind::Interp, Some(profile)) => {
                    let config = RunConfig { cpuid: profile.clone(), ..RunConfig::default() };
                    let report =
                        run_guest(&*kind.create(), &guest, &config).unwrap_or_else(|e| panic!("{kind}: {e}"));
                    slots_text(&labels, &read_slots(&report, mode, labels.len()))
                }
            };
            insta::with_settings!({
                snapshot_path => "../snapshots",
                prepend_module_to_snapshot => false,
                description => description.clone(),
                info => &replay.info,
            }, {
                insta::assert_snapshot!(snap.clone(), text);
            });
        }
        runs
    }

    /// As [`Batch::check`] without the snapshot, for results that depend on the host (CPUID).
    pub fn check_differential(self) -> Vec<(BackendKind, Vec<Slot>)> {
        let (name, mode) = (self.name.clone(), self.mode);
        let (guest, labels) = self.guest();
        differential(&name, mode, &guest, &labels)
    }

    /// Runs on one backend only (for instructions KVM cannot run on this host) and returns the slots.
    pub fn run_on(self, kind: BackendKind) -> (RunReport, Vec<Slot>) {
        self.run_on_with(kind, &RunConfig::default())
    }

    /// As [`Batch::run_on`] with a run configuration of its own (e.g. another CPUID profile).
    pub fn run_on_with(self, kind: BackendKind, config: &RunConfig) -> (RunReport, Vec<Slot>) {
        let mode = self.mode;
        let (guest, labels) = self.guest();
        let report = run_guest(&*kind.create(), &guest, config).unwrap_or_else(|e| panic!("{kind}: {e}"));
        let slots = read_slots(&report, mode, labels.len());
        (report, slots)
    }
}

/// Runs `guest` on every selected backend under this host's shared profile and checks: debug
/// exit 0, KVM == interpreter case by case and in the whole final state.
fn differential(name: &str, mode: Mode, guest: &Guest, labels: &[String]) -> Vec<(BackendKind, Vec<Slot>)> {
    let mut runs = Vec::new();
    for kind in testing::select_backends() {
        let report = run(kind, guest);
        assert_eq!(
            report.outcome.stop,
            StopReason::DebugExit { value: 0 },
            "{name} on {kind}: the batch did not finish\n{}",
            duet::run::format_regs(&report.outcome.state)
        );
        let slots = read_slots(&report, mode, labels.len());
        runs.push((kind, report, slots));
    }
    if let [(_, kvm, ks), (_, interp, is)] = &runs[..] {
        let bad: Vec<String> = labels
            .iter()
            .zip(ks.iter().zip(is))
            .filter(|(_, (k, i))| k != i)
            .map(|(l, (k, i))| format!("  {l}\n    kvm:   {}\n    interp:{}", k.text(), i.text()))
            .collect();
        assert!(
            bad.is_empty(),
            "{name}: {} cases differ (KVM vs software CPU):\n{}",
            bad.len(),
            bad.join("\n")
        );
        let diff = compare(kvm, interp);
        assert!(diff.is_empty(), "{name}: final states differ:\n{diff}");
    }
    runs.into_iter().map(|(k, _, s)| (k, s)).collect()
}

/// The replay rules for the committed snapshot `name` (tests/snapshots/NAME.snap) on this host
/// ([`duet::recording::snapshot_replay`]); a snapshot whose metadata does not parse fails the test.
pub fn snapshot_replay(name: &str, kvm_ran: bool) -> SnapshotReplay {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(format!("{name}.snap"));
    let text = std::fs::read_to_string(&path).ok();
    duet::recording::snapshot_replay(
        text.as_deref(),
        duet::Host::this(),
        kvm_ran,
        &duet::shared_cpuid_profile(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The slots as snapshot text, one line per case.
pub fn slots_text(labels: &[String], slots: &[Slot]) -> String {
    labels.iter().zip(slots).map(|(l, s)| format!("{l}:{}\n", s.text())).collect()
}

/// Runs `guest` on `kind` with the default configuration.
pub fn run(kind: BackendKind, guest: &Guest) -> RunReport {
    run_guest(&*kind.create(), guest, &RunConfig::default()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

/// Reads `n` result slots.
pub fn read_slots(report: &RunReport, mode: Mode, n: usize) -> Vec<Slot> {
    let base = linear(mode, results_addr(mode));
    (0..n)
        .map(|i| {
            let mut raw = [0u8; SLOT as usize];
            report
                .memory
                .read_slice(&mut raw, GuestAddress(base + i as u64 * SLOT))
                .unwrap_or_else(|e| panic!("reading slot {i}: {e}"));
            let w = |k: usize| u64::from_le_bytes(raw[k * 8..k * 8 + 8].try_into().unwrap_or_default());
            Slot { regs: [w(0), w(1), w(2), w(3), w(4), w(5)], flags: w(6) }
        })
        .collect()
}

/// Reads guest memory of a finished run.
pub fn read_mem(report: &RunReport, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    report.memory.read_slice(&mut v, GuestAddress(addr)).unwrap_or_else(|e| panic!("reading {addr:#x}: {e}"));
    v
}

/// Before each case: known stack, RFLAGS = 2, segments (real mode), six zeroed registers.
fn prologue(a: &mut CodeAssembler, mode: Mode) -> Result<(), IcedError> {
    match mode {
        Mode::Long => {
            a.mov(rsp, duet::core::layout::STACK_TOP)?;
            a.push(2)?;
            a.popfq()?;
        }
        Mode::Protected => {
            a.mov(esp, duet::core::layout::STACK_TOP as u32)?;
            a.push(2)?;
            a.popfd()?;
            a.mov(ax, 0x10)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
        }
        Mode::Real => {
            a.xor(esp, esp)?;
            a.mov(sp, duet::core::layout::REAL_MODE_STACK_TOP as u32)?;
            a.push(2)?;
            a.popf()?;
            a.mov(ax, (REAL_BASE >> 4) as u32)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
        }
    }
    for r in [eax, ebx, ecx, edx, esi, edi] {
        a.mov(r, 0)?;
    }
    Ok(())
}

/// After each case: PUSHF, store the six registers and the masked flags in the slot at `at`.
fn epilogue(a: &mut CodeAssembler, mode: Mode, at: u64, undefined: u64) -> Result<(), IcedError> {
    let keep = ((STATUS | DF) & !undefined) as u32;
    match mode {
        Mode::Long => {
            a.pushfq()?;
            for (k, r) in [rax, rbx, rcx, rdx, rsi, rdi].into_iter().enumerate() {
                a.mov(qword_ptr(at + 8 * k as u64), r)?;
            }
            a.pop(rax)?;
            a.and(eax, keep)?;
            // Leave the masked flags, not the raw ones, in the stack memory the run compares.
            a.push(rax)?;
            a.pop(rax)?;
            a.mov(qword_ptr(at + 48), rax)?;
        }
        Mode::Protected | Mode::Real => {
            // Real mode: DS may have been changed by the case; the slot is DS = 0x1000-relative.
            if mode == Mode::Real {
                a.pushfd()?;
                a.push(ax)?;
                a.mov(ax, (REAL_BASE >> 4) as u32)?;
                a.mov(ds, ax)?;
                a.pop(ax)?;
            } else {
                a.pushfd()?;
                a.push(eax)?;
                a.mov(ax, 0x10)?;
                a.mov(ds, ax)?;
                a.pop(eax)?;
            }
            for (k, r) in [eax, ebx, ecx, edx, esi, edi].into_iter().enumerate() {
                a.mov(dword_ptr(at + 8 * k as u64), r)?;
            }
            a.pop(eax)?;
            a.and(eax, keep)?;
            a.push(eax)?;
            a.pop(eax)?;
            a.mov(dword_ptr(at + 48), eax)?;
        }
    }
    Ok(())
}

/// Sets RFLAGS to `2 | bits` (status flags and DF) just before the instruction under test.
pub fn set_flags(a: &mut CodeAssembler, bits: u32, value: u64) -> Result<(), IcedError> {
    let v = (2 | (value & (STATUS | DF))) as i32;
    match bits {
        64 => {
            a.push(v)?;
            a.popfq()
        }
        32 => {
            a.push(v)?;
            a.popfd()
        }
        _ => {
            a.push(v)?;
            a.popf()
        }
    }
}

/// Register number `idx` (0 = A, 1 = C, 2 = D, 3 = B, 6 = SI, 7 = DI) in `size` bits.
pub fn reg(size: u32, idx: u32) -> Register {
    match size {
        8 => Register::AL + idx,
        16 => Register::AX + idx,
        32 => Register::EAX + idx,
        _ => Register::RAX + idx,
    }
}

/// Loads the full register `idx` with `value` (truncated to the code size).
pub fn load(a: &mut CodeAssembler, bits: u32, idx: u32, value: u64) -> Result<(), IcedError> {
    let ins = if bits == 64 {
        Instruction::with2(Code::Mov_r64_imm64, Register::RAX + idx, value)?
    } else {
        Instruction::with2(Code::Mov_r32_imm32, Register::EAX + idx, value as u32)?
    };
    a.add_instruction(ins)
}

/// All-ones of `size` bits.
pub fn ones(size: u32) -> u64 {
    if size == 64 {
        u64::MAX
    } else {
        (1u64 << size) - 1
    }
}

/// The edge operands of a size: 0, 1, the largest positive, the most negative, all ones, and a
/// mixed bit pattern.
pub fn edges(size: u32) -> Vec<u64> {
    let m = ones(size);
    let sign = 1u64 << (size - 1);
    vec![0, 1, sign - 1, sign, m, 0x5a3c_96e1_0f87_a5c3 & m]
}

/// Garbage for the bits above an operand, to see that 8/16-bit writes keep them and 32-bit
/// writes in 64-bit mode clear them.
pub fn with_garbage(size: u32, bits: u32, v: u64) -> u64 {
    if size >= bits {
        return v;
    }
    let garbage = 0xdead_beef_cafe_f00d_u64 & !ones(size) & ones(bits);
    garbage | (v & ones(size))
}

/// iced-x86's undefined RFLAGS bits of `ins`, in RFLAGS layout.
pub fn undefined_of(ins: &Instruction) -> u64 {
    from_iced(ins.rflags_undefined())
}

/// Converts iced-x86 `RflagsBits` to RFLAGS bit positions.
pub fn from_iced(bits: u32) -> u64 {
    use iced_x86::RflagsBits as I;
    [(I::OF, OF), (I::SF, SF), (I::ZF, ZF), (I::AF, AF), (I::CF, CF), (I::PF, PF), (I::DF, DF)]
        .iter()
        .filter(|(i, _)| bits & i != 0)
        .fold(0, |acc, (_, r)| acc | r)
}

/// Short size suffix for labels.
pub fn sz(size: u32) -> &'static str {
    match size {
        8 => "b",
        16 => "w",
        32 => "d",
        _ => "q",
    }
}

/// Where the long-mode IST1 exception frame keeps the saved RFLAGS (IST1_TOP − 24).
pub const IST1_FRAME_RFLAGS: u64 = 0x74000 - 24;

/// The QEMU reference's slots for `batch` (the third opinion where this host's KVM cannot decide),
/// or `None` after saying why QEMU is not usable here.
pub fn qemu_slots(batch: Batch) -> Option<Vec<Slot>> {
    qemu_slots_with(batch, &RunConfig::default())
}

/// As [`qemu_slots`] with a run configuration of its own (e.g. another CPUID profile).
pub fn qemu_slots_with(batch: Batch, config: &RunConfig) -> Option<Vec<Slot>> {
    if let duet::Availability::Unavailable(why) = duet::qemu::availability() {
        eprintln!("skipped: qemu: {why}");
        return None;
    }
    let mode = batch.mode;
    let (guest, labels) = batch.guest();
    let report = duet::run_qemu(&guest, config).unwrap_or_else(|e| panic!("under QEMU: {e}"));
    if report.outcome.stop != (StopReason::DebugExit { value: 0 }) {
        eprintln!("qemu: the batch did not finish: {}", report.outcome.stop);
        return None;
    }
    Some(read_slots(&report, mode, labels.len()))
}

/// Every opinion on a batch: each selected backend (KVM skipped out loud where it cannot run
/// the batch) and the QEMU reference when it is usable, as (who, report, slots).
pub fn opinions(what: &str, make: impl Fn() -> Batch) -> Vec<(String, RunReport, Vec<Slot>)> {
    let mut v = Vec::new();
    for kind in testing::select_backends() {
        let (report, slots) = make().run_on(kind);
        if let (BackendKind::Kvm, StopReason::CannotRun(why)) = (kind, &report.outcome.stop) {
            eprintln!("skipped: kvm: {what}: this host's KVM cannot run it ({why}); the SDM decides");
            continue;
        }
        v.push((kind.to_string(), report, slots));
    }
    match duet::qemu::availability() {
        duet::Availability::Available(_) => {
            let b = make();
            let mode = b.mode;
            let (guest, labels) = b.guest();
            match duet::run_qemu(&guest, &RunConfig::default()) {
                Ok(report) => {
                    let slots = read_slots(&report, mode, labels.len());
                    v.push(("qemu".into(), report, slots));
                }
                Err(e) => eprintln!("skipped: qemu: {what}: {e}"),
            }
        }
        duet::Availability::Unavailable(why) => eprintln!("skipped: qemu: {why}"),
    }
    v
}
