//! The guests the benchmarks run, each with a known shape so its cost per unit is meaningful.

use duet::fixtures::{assemble, FixtureError, GuestBuilder, Mode};
use duet_core::{CpuState, Guest, Segment};
use iced_x86::code_asm::*;

/// Where the exit guests' code sits (real mode, CS = 0).
pub const EXIT_CODE_ADDR: u64 = 0x1000;
/// RAM of an exit guest: 64 KiB, so everything from 0x10000 up is MMIO.
pub const EXIT_RAM: u64 = 0x1_0000;
/// The DS selector of an exit guest: DS:0 is guest physical 0x10000, the first unbacked byte.
pub const EXIT_MMIO_SEGMENT: u16 = 0x1000;
/// The port the port-I/O exit guests use (POST code: a standard device, as a guest would use).
pub const EXIT_PORT: u16 = 0x80;

/// The exit a guest of [`exit_guest`] takes once per loop iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// `out 0x80, al`.
    PortOut,
    /// `in al, 0x80`.
    PortIn,
    /// `mov al, [ds:0]` with DS:0 unbacked.
    MmioRead,
    /// `mov [ds:0], al` with DS:0 unbacked.
    MmioWrite,
    /// `hlt` with IF = 1; the host wakes the vCPU with an interrupt (vector
    /// [`EXIT_WAKE_VECTOR`], whose real-mode handler is `iret`) after each one.
    Hlt,
    /// `nop`: no exit at all — the loop's own cost, to subtract from the others.
    LoopOnly,
}

impl ExitKind {
    /// Every kind, the no-exit baseline last.
    pub const ALL: [ExitKind; 6] = [
        ExitKind::PortOut,
        ExitKind::PortIn,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::LoopOnly,
    ];

    /// Short name used in benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PortOut => "port-out",
            ExitKind::PortIn => "port-in",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::LoopOnly => "loop-only",
        }
    }
}

/// The vector that wakes the HLT exit guest.
pub const EXIT_WAKE_VECTOR: u8 = 0x20;
/// Where the HLT exit guest's interrupt handler (`iret`) sits.
const EXIT_HANDLER_ADDR: u64 = 0x1800;

/// Real-mode code at [`EXIT_CODE_ADDR`]: `l: <exit>; dec ecx; jnz l; out 0xF4, al; hlt`
/// (`sti` first in the HLT guest).
///
/// The host puts the number of exits wanted in ECX; the debug exit ends the batch.
pub fn exit_code(kind: ExitKind) -> Result<Vec<u8>, FixtureError> {
    assemble(16, EXIT_CODE_ADDR, |a| {
        let mut top = a.create_label();
        if kind == ExitKind::Hlt {
            a.sti()?;
        }
        a.set_label(&mut top)?;
        match kind {
            ExitKind::PortOut => a.out(i32::from(EXIT_PORT), al)?,
            ExitKind::PortIn => a.in_(al, i32::from(EXIT_PORT))?,
            ExitKind::MmioRead => a.mov(al, byte_ptr(0))?,
            ExitKind::MmioWrite => a.mov(byte_ptr(0), al)?,
            ExitKind::Hlt => a.hlt()?,
            ExitKind::LoopOnly => a.nop()?,
        }
        a.dec(ecx)?;
        a.jnz(top)?;
        a.xor(al, al)?;
        a.out(0xf4, al)?;
        a.hlt()?;
        Ok(())
    })
}

/// The images of an exit guest, (guest physical address, bytes): the code, and for the HLT
/// guest an IVT entry for [`EXIT_WAKE_VECTOR`] and its `iret` handler.
pub fn exit_images(kind: ExitKind) -> Result<Vec<(u64, Vec<u8>)>, FixtureError> {
    let mut images = vec![(EXIT_CODE_ADDR, exit_code(kind)?)];
    if kind == ExitKind::Hlt {
        let mut ivt_entry = (EXIT_HANDLER_ADDR as u16).to_le_bytes().to_vec();
        ivt_entry.extend_from_slice(&[0, 0]); // segment 0
        images.push((u64::from(EXIT_WAKE_VECTOR) * 4, ivt_entry));
        images.push((EXIT_HANDLER_ADDR, vec![0xcf])); // iret
    }
    Ok(images)
}

/// The duet guest for [`exit_code`]: 64 KiB of RAM, real mode, CS = 0, DS = 0x1000.
pub fn exit_guest(kind: ExitKind) -> Result<Guest, FixtureError> {
    let mut g = Guest::new(format!("exit-{}", kind.name()), EXIT_RAM);
    for (addr, bytes) in exit_images(kind)? {
        g.load(addr, bytes);
    }
    g.state = CpuState::reset();
    g.state.sregs.cs = Segment::real_mode(0, true);
    for s in [&mut g.state.sregs.ss, &mut g.state.sregs.es] {
        *s = Segment::real_mode(0, false);
    }
    g.state.sregs.ds = Segment::real_mode(EXIT_MMIO_SEGMENT, false);
    g.state.regs.rip = EXIT_CODE_ADDR;
    g.state.regs.rsp = 0x8000;
    Ok(g)
}

/// A software-CPU speed workload: a long-mode guest and the instructions it retires per run.
pub struct SpeedWorkload {
    /// Benchmark id.
    pub name: &'static str,
    /// What it exercises.
    pub what: &'static str,
    /// The guest.
    pub guest: Guest,
}

/// Iterations of the ALU loop (8 instructions each).
pub const ALU_ITERS: u32 = 200_000;
/// Bytes copied per pass of the copy loop.
pub const COPY_BYTES: u32 = 64 << 10;
/// Passes of the copy loop.
pub const COPY_PASSES: u32 = 8;
/// Calls of the call/return loop.
pub const CALL_ITERS: u32 = 200_000;
/// Pages the paging loop touches per pass (16 MiB of 4 KiB pages).
pub const PAGING_PAGES: u32 = 4096;
/// Passes of the paging loop, each after a CR3 reload (a full TLB flush).
pub const PAGING_PASSES: u32 = 16;
/// First byte of the region the paging loop maps with 4 KiB pages.
const PAGING_BASE: u64 = 0x100_0000;
/// Where the paging loop's page tables go (8 PTs map 16 MiB).
const PAGING_PTS: u64 = 0x40_0000;
/// The identity map's first page directory (fixtures' layout: PML4, PDPT, then PD0).
const PD0: u64 = duet_core::layout::PAGE_TABLES_ADDR + 0x2000;

fn long(
    name: &str,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), FixtureError> + 'static,
) -> GuestBuilder {
    GuestBuilder::new(Mode::Long).name(name).code(f)
}

/// `mov al, 0; out 0xF4, al` — the debug exit with 0.
fn done(a: &mut CodeAssembler) -> Result<(), FixtureError> {
    duet::fixtures::asm::exit(a, 0)
}

pub use duet::fixtures::asm::alu_loop;

/// The ALU loop: add, xor, sub, shl, or, and, then `dec ecx; jnz`.
pub fn alu(div: u32) -> Result<SpeedWorkload, FixtureError> {
    let guest = long("alu-loop", move |a| {
        alu_loop(a, ALU_ITERS / div)?;
        done(a)
    })
    .build()?;
    Ok(SpeedWorkload { name: "alu", what: "register ALU loop", guest })
}

/// The catalogue's `sieve` fixture (primes below 10,000, printed through the serial port).
pub fn sieve() -> Result<SpeedWorkload, FixtureError> {
    let fixture = duet::fixtures::find("sieve")
        .ok_or_else(|| FixtureError::Asm("the catalogue has no `sieve`".into()))?;
    Ok(SpeedWorkload { name: "sieve", what: "catalogue fixture `sieve`", guest: fixture.guest()? })
}

/// The copy loop: 8-byte loads and stores, 64 KiB from 2 MiB to 3 MiB, eight times.
pub fn copy(div: u32) -> Result<SpeedWorkload, FixtureError> {
    let guest = long("copy-loop", move |a| {
        let (mut pass, mut top) = (a.create_label(), a.create_label());
        a.mov(r9d, (COPY_PASSES / div).max(1))?;
        a.set_label(&mut pass)?;
        a.mov(rsi, 0x20_0000u64)?;
        a.mov(rdi, 0x30_0000u64)?;
        a.mov(ecx, COPY_BYTES / 8)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rsi, 8)?;
        a.add(rdi, 8)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.dec(r9d)?;
        a.jnz(pass)?;
        done(a)
    })
    .build()?;
    Ok(SpeedWorkload { name: "copy", what: "memory copy loop, 8-byte mov", guest })
}

/// The call/return loop: `call f; dec ecx; jnz` with `f: add eax, ecx; ret`.
pub fn call_ret(div: u32) -> Result<SpeedWorkload, FixtureError> {
    let guest = long("call-loop", move |a| {
        let (mut top, mut f, mut end) = (a.create_label(), a.create_label(), a.create_label());
        a.mov(ecx, CALL_ITERS / div)?;
        a.set_label(&mut top)?;
        a.call(f)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.jmp(end)?;
        a.set_label(&mut f)?;
        a.add(eax, ecx)?;
        a.ret()?;
        a.set_label(&mut end)?;
        done(a)
    })
    .build()?;
    Ok(SpeedWorkload { name: "call-ret", what: "call/ret loop", guest })
}

/// The paging loop: 16 MiB remapped with 4 KiB pages; each pass reloads CR3 and stores to
/// every page once, so each store is a TLB miss and a four-level walk.
pub fn paging(div: u32) -> Result<SpeedWorkload, FixtureError> {
    let flags = 0b111u64; // P | RW | US
    let pts = (PAGING_PAGES / 512) as u64;
    let mut tables = Vec::with_capacity((pts * 4096) as usize);
    for page in 0..u64::from(PAGING_PAGES) {
        tables.extend_from_slice(&((PAGING_BASE + page * 4096) | flags).to_le_bytes());
    }
    let first_pde = PAGING_BASE >> 21;
    let mut pdes = Vec::new();
    for i in 0..pts {
        pdes.extend_from_slice(&((PAGING_PTS + i * 4096) | flags).to_le_bytes());
    }
    let guest = long("paging-loop", move |a| {
        let (mut pass, mut top) = (a.create_label(), a.create_label());
        a.mov(r9d, (PAGING_PASSES / div).max(1))?;
        a.set_label(&mut pass)?;
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        a.mov(rdi, PAGING_BASE)?;
        a.mov(ecx, PAGING_PAGES)?;
        a.set_label(&mut top)?;
        a.mov(dword_ptr(rdi), ecx)?;
        a.add(rdi, 4096)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.dec(r9d)?;
        a.jnz(pass)?;
        done(a)
    })
    .load(PAGING_PTS, tables)
    .patch(PD0 + first_pde * 8, pdes)
    .build()?;
    Ok(SpeedWorkload { name: "paging", what: "4 KiB-page stores after a CR3 reload", guest })
}

/// Every speed workload, in report order, with its loop counts divided by `div` (1 for the
/// figures; more for a quick smoke run).
pub fn speed_workloads(div: u32) -> Result<Vec<SpeedWorkload>, FixtureError> {
    let div = div.max(1);
    Ok(vec![alu(div)?, sieve()?, copy(div)?, call_ret(div)?, paging(div)?])
}

/// The smallest useful guest: its first instruction is the debug exit.
pub fn first_exit() -> Result<Guest, FixtureError> {
    long("first-exit", done).build()
}

/// A small differential case: a handful of ALU and flag instructions on seeded registers, then
/// a store and the debug exit — the shape of a generated fuzz case.
pub fn diff_case(seed: u64) -> Result<Guest, FixtureError> {
    let mut g = long("diff-case", |a| {
        a.add(rax, rbx)?;
        a.imul_2(rcx, rdx)?;
        a.xor(rsi, rax)?;
        a.rol(rdi, 7)?;
        a.adc(rbx, rsi)?;
        a.sbb(rdx, rcx)?;
        a.bsf(r8, rax)?;
        a.setc(r9b)?;
        a.mov(qword_ptr(0x20_0000u64), rax)?;
        done(a)
    })
    .build()?;
    let mut x = seed | 1;
    for r in [
        &mut g.state.regs.rax,
        &mut g.state.regs.rbx,
        &mut g.state.regs.rcx,
        &mut g.state.regs.rdx,
        &mut g.state.regs.rsi,
        &mut g.state.regs.rdi,
    ] {
        // xorshift64: a fixed, reproducible register pattern per seed.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *r = x;
    }
    Ok(g)
}
