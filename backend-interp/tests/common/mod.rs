//! Test helpers: tiny guests in real, protected and long mode, built by hand (GDT, IDT, page
//! tables) so these tests depend on nothing but duet-core and iced-x86.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use duet_core::state::{ctrl, rflags};
use duet_core::vm_memory::{Bytes, GuestAddress};
use duet_core::{
    BusDevice, CpuState, CpuidProfile, DescriptorTable, Guest, GuestMemory, Machine, RunOptions, RunOutcome,
    Segment, WriteOutcome,
};
use duet_interp::InterpVcpu;
use iced_x86::code_asm::CodeAssembler;

/// Guest RAM used by every test: 4 MiB.
pub const RAM: u64 = 4 << 20;
/// Where test code is loaded.
pub const CODE: u64 = 0x8000;
/// Protected/long-mode stack top.
pub const STACK: u64 = 0x7_0000;
/// GDT, IDT, TSS, exception stubs.
pub const GDT: u64 = 0x1000;
/// IDT base.
pub const IDT: u64 = 0x2000;
/// One stub per vector, 8 bytes apart: `push imm32 vector; hlt`.
pub const STUBS: u64 = 0x3000;
/// 32-bit TSS.
pub const TSS: u64 = 0x600;
/// Ring-0 stack used on privilege changes.
pub const STACK0: u64 = 0x6_0000;
/// Page tables (long mode: PML4, PDPT, PD; 32-bit: PD, PT).
pub const PT: u64 = 0x10000;

/// GDT selectors.
pub mod sel {
    /// Ring-0 32-bit code.
    pub const CODE32: u16 = 0x08;
    /// Ring-0 data.
    pub const DATA: u16 = 0x10;
    /// Ring-3 32-bit code.
    pub const UCODE32: u16 = 0x18 | 3;
    /// Ring-3 data.
    pub const UDATA: u16 = 0x20 | 3;
    /// 32-bit TSS.
    pub const TSS: u16 = 0x28;
    /// Ring-0 64-bit code.
    pub const CODE64: u16 = 0x30;
    /// Ring-3 64-bit code.
    pub const UCODE64: u16 = 0x38 | 3;
}

/// The GDT every protected/long-mode test uses.
pub fn gdt() -> Vec<u64> {
    let tss =
        Segment { base: TSS, limit: 0x67, type_: 0x9, present: true, ..Segment::default() }.to_descriptor();
    vec![
        0,
        0x00cf_9b00_0000_ffff, // 0x08 code32 ring 0
        0x00cf_9300_0000_ffff, // 0x10 data ring 0
        0x00cf_fb00_0000_ffff, // 0x18 code32 ring 3
        0x00cf_f300_0000_ffff, // 0x20 data ring 3
        tss,                   // 0x28 TSS
        0x00af_9b00_0000_ffff, // 0x30 code64 ring 0
        0x00af_fb00_0000_ffff, // 0x38 code64 ring 3
        0,                     // upper half of a 64-bit TSS, when used
    ]
}

/// Console (0xE9) output collected by a test device.
#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl BusDevice for Console {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> WriteOutcome {
        self.0.lock().unwrap().extend_from_slice(data);
        WriteOutcome::Continue
    }
}

impl Console {
    /// The bytes written so far.
    pub fn text(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// Builds guest memory with `code` at [`CODE`].
pub fn memory(code: &[u8]) -> Arc<GuestMemory> {
    let mut g = Guest::new("test", RAM);
    g.load(CODE, code.to_vec());
    g.build_memory().unwrap()
}

/// Assembles with `f` for `bitness` at [`CODE`].
pub fn asm(bitness: u32, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a);
    a.assemble(CODE).unwrap()
}

/// Writes `v` at `addr`.
pub fn poke(mem: &GuestMemory, addr: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(addr)).unwrap();
}

/// Reads a little-endian u64 at `addr`.
pub fn peek64(mem: &GuestMemory, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
    u64::from_le_bytes(b)
}

/// Reads a little-endian u32 at `addr`.
pub fn peek32(mem: &GuestMemory, addr: u64) -> u32 {
    peek64(mem, addr) as u32
}

/// Real mode at 0000:CODE with SS:SP = 0:7000 and an IVT whose every vector points at a
/// `push vector; hlt` stub in segment 0.
pub fn real_mode(mem: &GuestMemory) -> CpuState {
    for v in 0..256u64 {
        let stub = STUBS + v * 8;
        // push imm16 (68 iw); hlt
        poke(mem, stub, &[0x68, v as u8, 0, 0xf4]);
        poke(mem, v * 4, &[(stub & 0xff) as u8, (stub >> 8) as u8, 0, 0]);
    }
    let mut s = CpuState::reset();
    s.sregs.cs = Segment::real_mode(0, true);
    s.regs.rip = CODE;
    s.regs.rsp = 0x7000;
    s
}

fn write_gdt_tss(mem: &GuestMemory) {
    for (i, d) in gdt().iter().enumerate() {
        poke(mem, GDT + 8 * i as u64, &d.to_le_bytes());
    }
    // 32-bit TSS: ESP0 at 4, SS0 at 8; 64-bit TSS: RSP0 at 4 (overlaps: both written for the test).
    poke(mem, TSS + 4, &(STACK0 as u32).to_le_bytes());
    poke(mem, TSS + 8, &u32::from(sel::DATA).to_le_bytes());
    // I/O bitmap base beyond the limit: no bitmap.
    poke(mem, TSS + 0x66, &0x68u16.to_le_bytes());
}

fn flat(selector: u16, code: bool, l: bool) -> Segment {
    let raw = gdt()[usize::from(selector >> 3)];
    let mut s = Segment::from_descriptor(selector, raw);
    s.type_ |= 1;
    if code {
        s.l = l;
    }
    s
}

/// 32-bit protected mode (ring 0, flat, no paging), with an IDT of 32-bit interrupt gates to
/// `push vector; hlt` stubs.
pub fn protected32(mem: &GuestMemory) -> CpuState {
    write_gdt_tss(mem);
    for v in 0..256u64 {
        let stub = STUBS + v * 8;
        // push imm32 (68 id); hlt
        let mut b = vec![0x68];
        b.extend_from_slice(&(v as u32).to_le_bytes());
        b.push(0xf4);
        poke(mem, stub, &b);
        let gate = (stub & 0xffff)
            | (u64::from(sel::CODE32) << 16)
            | (0x8e_u64 << 40)
            | ((stub & 0xffff_0000) << 32);
        poke(mem, IDT + v * 8, &gate.to_le_bytes());
    }
    let mut s = CpuState::reset();
    s.sregs.cr0 |= ctrl::CR0_PE;
    s.sregs.cs = flat(sel::CODE32, true, false);
    let d = flat(sel::DATA, false, false);
    (s.sregs.ds, s.sregs.es, s.sregs.fs, s.sregs.gs, s.sregs.ss) = (d, d, d, d, d);
    s.sregs.gdt = DescriptorTable { base: GDT, limit: (gdt().len() * 8 - 1) as u16 };
    s.sregs.idt = DescriptorTable { base: IDT, limit: 256 * 8 - 1 };
    let mut tr = Segment::from_descriptor(sel::TSS, gdt()[5]);
    tr.type_ = 0xb;
    s.sregs.tr = tr;
    s.regs.rip = CODE;
    s.regs.rsp = STACK;
    s.regs.rflags = rflags::FIXED;
    s
}

/// 32-bit paging over the first 4 MiB with 4 KiB pages, all user/writable (PD at PT, table at
/// PT + 0x1000). Returns the state with CR0.PG and CR3 set.
pub fn paging32(mem: &GuestMemory, mut s: CpuState) -> CpuState {
    poke(mem, PT, &((PT + 0x1000) as u32 | 7).to_le_bytes());
    for i in 0..1024u64 {
        poke(mem, PT + 0x1000 + i * 4, &((i << 12) as u32 | 7).to_le_bytes());
    }
    s.sregs.cr3 = PT;
    s.sregs.cr0 |= ctrl::CR0_PG;
    s
}

/// Overwrites the 32-bit PTE of `page` (a linear = physical address in the first 4 MiB).
pub fn set_pte32(mem: &GuestMemory, page: u64, pte: u32) {
    poke(mem, PT + 0x1000 + (page >> 12) * 4, &pte.to_le_bytes());
}

/// 64-bit long mode (ring 0), first 1 GiB identity-mapped with 2 MiB pages, IDT of 64-bit
/// interrupt gates to `push vector; hlt` stubs.
pub fn long64(mem: &GuestMemory) -> CpuState {
    let mut s = protected32(mem);
    // 64-bit TSS: RSP0 at 4 (8 bytes), IST1 at 0x24.
    poke(mem, TSS + 4, &STACK0.to_le_bytes());
    for v in 0..256u64 {
        let stub = STUBS + v * 8;
        let gate_lo = (stub & 0xffff)
            | (u64::from(sel::CODE64) << 16)
            | (0x8e_u64 << 40)
            | ((stub & 0xffff_0000) << 32);
        poke(mem, IDT + v * 16, &gate_lo.to_le_bytes());
        poke(mem, IDT + v * 16 + 8, &(stub >> 32).to_le_bytes());
    }
    poke(mem, PT, &((PT + 0x1000) | 7).to_le_bytes());
    poke(mem, PT + 0x1000, &((PT + 0x2000) | 7).to_le_bytes());
    for i in 0..512u64 {
        poke(mem, PT + 0x2000 + i * 8, &((i << 21) | 0x87).to_le_bytes());
    }
    s.sregs.idt = DescriptorTable { base: IDT, limit: 256 * 16 - 1 };
    s.sregs.cr3 = PT;
    s.sregs.cr4 |= ctrl::CR4_PAE;
    s.sregs.efer |= ctrl::EFER_LME | ctrl::EFER_LMA;
    s.sregs.cr0 |= ctrl::CR0_PG;
    s.sregs.cs = flat(sel::CODE64, true, true);
    s.sregs.cs.db = false;
    // 64-bit TSS descriptor type 0xB (busy), base TSS.
    s.sregs.tr.type_ = 0xb;
    s
}

/// Runs `state` over `mem` on the interpreter with a console on 0xE9, until a terminal event.
pub fn run(mem: Arc<GuestMemory>, state: &CpuState) -> (RunOutcome, Console) {
    run_with(mem, state, Duration::from_secs(5), |_| {})
}

/// Like [`run`], with a timeout and a hook to add devices.
pub fn run_with(
    mem: Arc<GuestMemory>,
    state: &CpuState,
    timeout: Duration,
    setup: impl FnOnce(&mut Machine<InterpVcpu>),
) -> (RunOutcome, Console) {
    run_profile(mem, state, &CpuidProfile::baseline(), timeout, setup)
}

/// Like [`run_with`], on a vCPU created with CPUID `profile`.
pub fn run_profile(
    mem: Arc<GuestMemory>,
    state: &CpuState,
    profile: &CpuidProfile,
    timeout: Duration,
    setup: impl FnOnce(&mut Machine<InterpVcpu>),
) -> (RunOutcome, Console) {
    use duet_core::Vcpu;
    let mut vcpu = InterpVcpu::new(mem.clone(), profile);
    vcpu.set_state(state).unwrap();
    let mut m = Machine::with_vcpu(mem, vcpu);
    let console = Console::default();
    m.pio.insert(0xe9, 1, Arc::new(Mutex::new(console.clone()))).unwrap();
    setup(&mut m);
    let out = m.run(&RunOptions { timeout }).unwrap();
    (out, console)
}

/// The vector whose protected/long-mode stub (`push imm32; hlt`) the run halted in, if any.
pub fn stub_vector(s: &CpuState) -> Option<u64> {
    let off = s.regs.rip.checked_sub(STUBS + 6)?;
    (off % 8 == 0 && off / 8 < 256).then_some(off / 8)
}

/// `profile` with `bits` cleared in register `reg` (0 = EAX … 3 = EDX) of leaf `function`.
pub fn without(profile: &CpuidProfile, function: u32, reg: usize, bits: u32) -> CpuidProfile {
    let mut p = profile.clone();
    for e in p.entries.iter_mut().filter(|e| e.function == function) {
        match reg {
            0 => e.eax &= !bits,
            1 => e.ebx &= !bits,
            2 => e.ecx &= !bits,
            _ => e.edx &= !bits,
        }
    }
    p
}

/// `profile` with `bits` set in register `reg` (0 = EAX … 3 = EDX) of leaf `function`.
pub fn with(profile: &CpuidProfile, function: u32, reg: usize, bits: u32) -> CpuidProfile {
    let mut p = profile.clone();
    for e in p.entries.iter_mut().filter(|e| e.function == function) {
        match reg {
            0 => e.eax |= bits,
            1 => e.ebx |= bits,
            2 => e.ecx |= bits,
            _ => e.edx |= bits,
        }
    }
    p
}

/// Runs `state` over a fresh copy of guest memory on KVM (the baseline profile restricted to
/// the host), with the console on 0xE9; `None` after printing why when KVM is unusable.
pub fn run_kvm(
    build: impl Fn() -> (Arc<GuestMemory>, CpuState),
) -> Option<(RunOutcome, Console, Arc<GuestMemory>)> {
    use duet_core::Vcpu;
    let kvm = duet_kvm::testing::kvm_or_skip()?;
    let profile = CpuidProfile::baseline().restricted_to(&kvm.host_cpuid().unwrap());
    let (mem, state) = build();
    let mut vcpu = kvm.create(mem.clone(), &profile).unwrap();
    vcpu.set_state(&state).unwrap();
    let mut m = Machine::with_vcpu(mem.clone(), vcpu);
    let console = Console::default();
    m.pio.insert(0xe9, 1, Arc::new(Mutex::new(console.clone()))).unwrap();
    let out = m.run(&RunOptions { timeout: Duration::from_secs(10) }).unwrap();
    Some((out, console, mem))
}

/// The baseline profile presenting `vendor` (every feature leaf unchanged).
pub fn vendor_profile(vendor: duet_core::Vendor) -> CpuidProfile {
    CpuidProfile::baseline().with_vendor(vendor)
}

/// KVM, when `DUET_BACKENDS` asks for it and it is usable; else `None` after printing
/// `skipped: kvm: <why>` (`DUET_REQUIRE_KVM=1` turns an unusable KVM into a failure).
pub fn kvm_backend() -> Option<duet_kvm::KvmBackend> {
    if let Ok(list) = std::env::var("DUET_BACKENDS") {
        if !list.split(',').any(|b| matches!(b.trim(), "kvm" | "all")) {
            println!("skipped: kvm: DUET_BACKENDS={list} leaves it out");
            return None;
        }
    }
    duet_kvm::testing::kvm_or_skip()
}

/// Runs `state` over `mem` on `kvm` with the baseline profile restricted to the host (its
/// vendor is the host's), with the console on 0xE9.
pub fn run_on_kvm(kvm: &duet_kvm::KvmBackend, mem: Arc<GuestMemory>, state: &CpuState) -> RunOutcome {
    use duet_core::Vcpu;
    let profile = CpuidProfile::baseline().restricted_to(&kvm.host_cpuid().unwrap());
    let mut vcpu = kvm.create(mem.clone(), &profile).unwrap();
    vcpu.set_state(state).unwrap();
    let mut m = Machine::with_vcpu(mem, vcpu);
    let console = Console::default();
    m.pio.insert(0xe9, 1, Arc::new(Mutex::new(console))).unwrap();
    m.run(&RunOptions { timeout: Duration::from_secs(10) }).unwrap()
}

/// The vendor of the profile KVM applies on this host (the host's), when KVM is usable.
pub fn kvm_vendor(kvm: &duet_kvm::KvmBackend) -> duet_core::Vendor {
    kvm.host_cpuid().unwrap().vendor_kind()
}

/// `long64` switched to ring 3: 64-bit code in CS [`sel::UCODE64`], SS and the data segments
/// [`sel::UDATA`]; exceptions go to the ring-0 stubs on the TSS's RSP0 stack.
pub fn long64_ring3(mem: &GuestMemory) -> CpuState {
    let mut s = long64(mem);
    s.sregs.cs = flat(sel::UCODE64, true, true);
    s.sregs.cs.db = false;
    let d = flat(sel::UDATA, false, false);
    (s.sregs.ds, s.sregs.es, s.sregs.fs, s.sregs.gs, s.sregs.ss) = (d, d, d, d, d);
    s
}

/// `long64_ring3` in compatibility mode: 32-bit code in CS [`sel::UCODE32`].
pub fn compat_ring3(mem: &GuestMemory) -> CpuState {
    let mut s = long64_ring3(mem);
    s.sregs.cs = flat(sel::UCODE32, true, false);
    s
}

/// An exception a run ended in, read from the frame its stub left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trap {
    /// Vector.
    pub vector: u64,
    /// Error code, for the vectors that push one.
    pub error: Option<u64>,
    /// Saved RIP/EIP.
    pub rip: u64,
    /// Saved CS selector.
    pub cs: u64,
    /// Saved RSP/ESP (64-bit frames always hold it; 32-bit ones after a privilege change).
    pub rsp: u64,
    /// Saved SS selector (as `rsp`).
    pub ss: u64,
}

/// The exception a long-mode run stopped in (a stub's `push vector; hlt`), from the 64-bit
/// frame under the pushed vector.
pub fn long_trap(out: &RunOutcome, mem: &GuestMemory) -> Option<Trap> {
    let vector = stub_vector(&out.state)?;
    let sp = out.state.regs.rsp;
    let has_error = matches!(vector, 8 | 10..=14 | 17);
    let frame = if has_error { sp + 16 } else { sp + 8 };
    let error = has_error.then(|| peek64(mem, sp + 8));
    let q = |k: u64| peek64(mem, frame + 8 * k);
    Some(Trap { vector, error, rip: q(0), cs: q(1), rsp: q(3), ss: q(4) })
}

/// The exception a 32-bit protected-mode run stopped in, from the 32-bit frame (`rsp` and
/// `ss` are 0 when the frame has no outer stack, i.e. no privilege change).
pub fn prot_trap(out: &RunOutcome, mem: &GuestMemory) -> Option<Trap> {
    let vector = stub_vector(&out.state)?;
    let sp = out.state.regs.rsp;
    let has_error = matches!(vector, 8 | 10..=14 | 17);
    let frame = if has_error { sp + 8 } else { sp + 4 };
    let error = has_error.then(|| u64::from(peek32(mem, sp + 4)));
    let d = |k: u64| u64::from(peek32(mem, frame + 4 * k));
    let outer = d(1) & 3 != 0;
    Some(Trap {
        vector,
        error,
        rip: d(0),
        cs: d(1),
        rsp: if outer { d(3) } else { 0 },
        ss: if outer { d(4) } else { 0 },
    })
}

/// Edits a test makes to guest memory and the start state before a run.
pub type Prep = Box<dyn Fn(&GuestMemory, &mut CpuState)>;

/// One guest run on the software CPU under either vendor's profile and, where it can decide,
/// on KVM: `code` (ending in HLT or an exception) at [`CODE`], a start state and edits to it.
pub struct Probe {
    code: Vec<u8>,
    state: fn(&GuestMemory) -> CpuState,
    prep: Prep,
}

impl Probe {
    /// `code` assembled for `bits`, run from `state`.
    pub fn new(
        bits: u32,
        state: fn(&GuestMemory) -> CpuState,
        code: impl FnOnce(&mut CodeAssembler),
    ) -> Self {
        Probe { code: asm(bits, code), state, prep: Box::new(|_, _| {}) }
    }

    /// The same with `prep` applied to memory and state before each run.
    pub fn prep(mut self, prep: impl Fn(&GuestMemory, &mut CpuState) + 'static) -> Self {
        self.prep = Box::new(prep);
        self
    }

    fn build(&self) -> (Arc<GuestMemory>, CpuState) {
        let mem = memory(&self.code);
        let mut s = (self.state)(&mem);
        (self.prep)(&mem, &mut s);
        (mem, s)
    }

    /// Runs on the software CPU with the baseline profile of `vendor`.
    pub fn interp(&self, vendor: duet_core::Vendor) -> (RunOutcome, Arc<GuestMemory>) {
        self.interp_with(&vendor_profile(vendor))
    }

    /// Runs on the software CPU with `profile`.
    pub fn interp_with(&self, profile: &CpuidProfile) -> (RunOutcome, Arc<GuestMemory>) {
        let (mem, s) = self.build();
        let (out, _) = run_profile(mem.clone(), &s, profile, Duration::from_secs(5), |_| {});
        (out, mem)
    }

    /// Runs on `kvm` (the host's vendor).
    pub fn kvm(&self, kvm: &duet_kvm::KvmBackend) -> (RunOutcome, Arc<GuestMemory>) {
        let (mem, s) = self.build();
        (run_on_kvm(kvm, mem.clone(), &s), mem)
    }

    /// The KVM half of a vendor test: runs on KVM and checks `view` of it against the software
    /// CPU under the profile of the host's vendor; skips out loud without KVM, under
    /// `DUET_BACKENDS=interp`, or when this host's KVM cannot run the code.
    pub fn check_on_kvm(&self, what: &str, view: impl Fn(&RunOutcome, &GuestMemory) -> String) {
        let Some(kvm) = kvm_backend() else { return };
        let vendor = kvm_vendor(&kvm);
        let (k, kmem) = self.kvm(&kvm);
        if let duet_core::StopReason::CannotRun(why) = &k.stop {
            println!("skipped: kvm: {what}: this host's KVM cannot run it ({})", why.reason);
            return;
        }
        let (i, imem) = self.interp(vendor);
        assert_eq!(view(&k, &kmem), view(&i, &imem), "{what}: KVM ({vendor} host) against the software CPU");
    }
}
