//! Exits: port I/O, MMIO round trips (re-executed reads, completed writes), interrupt
//! injection through the real-mode IVT, HLT wake-up, self-modifying code, deadline, single step.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use duet_core::{BusDevice, CpuidProfile, DebugEvent, StopReason, Vcpu, VcpuExit, WriteOutcome};
use duet_interp::InterpVcpu;
use iced_x86::code_asm::*;

const MMIO: u64 = 0xd000_0000;

/// Reads return 0x10 + offset + i; writes are recorded.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Writes>>, Arc<Mutex<u32>>);

/// Writes a device saw: offset and bytes.
type Writes = Vec<(u64, Vec<u8>)>;

impl BusDevice for Fake {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        *self.1.lock().unwrap() += 1;
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0x10 + offset as u8 + i as u8;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        self.0.lock().unwrap().push((offset, data.to_vec()));
        WriteOutcome::Continue
    }
}

#[test]
fn mmio_read_write_and_read_modify_write_round_trip() {
    let code = asm(32, |a| {
        a.mov(eax, dword_ptr(MMIO as u32)).unwrap();
        a.mov(dword_ptr(MMIO as u32 + 0x10), eax).unwrap();
        a.add(dword_ptr(MMIO as u32 + 0x20), 1).unwrap();
        a.inc(ecx).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let dev = Fake::default();
    let d2 = dev.clone();
    let (out, _) = run_with(mem, &s, Duration::from_secs(5), move |m| {
        m.mmio.insert(MMIO, 0x1000, Arc::new(Mutex::new(d2))).unwrap();
    });
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax, 0x1312_1110);
    let writes = dev.0.lock().unwrap().clone();
    // ADD reads 0x33323130 at offset 0x20 and writes back one more.
    assert_eq!(writes, vec![(0x10, vec![0x10, 0x11, 0x12, 0x13]), (0x20, vec![0x31, 0x31, 0x32, 0x33])]);
    // Each read reached the device once and every instruction retired once.
    assert_eq!(*dev.1.lock().unwrap(), 2);
    assert_eq!(out.state.regs.rcx, 1);
    assert_eq!(out.instructions, Some(5));
}

#[test]
fn in_and_out_reach_the_port_bus() {
    let code = asm(16, |a| {
        a.in_(al, 0x60).unwrap();
        a.mov(bl, al).unwrap();
        a.mov(dx, 0x61).unwrap();
        a.in_(ax, dx).unwrap();
        a.out(dx, al).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    let dev = Fake::default();
    let d2 = dev.clone();
    let (out, _) = run_with(mem, &s, Duration::from_secs(5), move |m| {
        m.pio.insert(0x60, 4, Arc::new(Mutex::new(d2))).unwrap();
    });
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rbx & 0xff, 0x10);
    // IN AX, DX at offset 1 reads 0x11 then 0x12.
    assert_eq!(out.state.regs.rax & 0xffff, 0x1211);
    assert_eq!(dev.0.lock().unwrap().clone(), vec![(1, vec![0x11])]);
}

#[test]
fn rep_outsb_sends_every_byte() {
    let code = asm(16, |a| {
        a.mov(si, 0x9000).unwrap();
        a.mov(cx, 4).unwrap();
        a.mov(dx, 0xe9).unwrap();
        a.rep().outsb().unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, 0x9000, b"duet");
    let s = real_mode(&mem);
    let (out, console) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(console.text(), b"duet");
    // MOV, MOV, MOV, REP OUTSB (once, for its four iterations), HLT.
    assert_eq!(out.instructions, Some(5));
}

#[test]
fn injected_interrupt_wakes_hlt_through_the_ivt() {
    let handler = CODE + 0x100;
    let code = asm(16, |a| {
        a.sti().unwrap();
        a.hlt().unwrap();
        a.mov(al, b'E' as u32).unwrap();
        a.out(0xe9, al).unwrap();
        a.hlt().unwrap();
    });
    let isr = asm(16, |a| {
        a.mov(bp, sp).unwrap();
        a.mov(bx, word_ptr(bp)).unwrap();
        a.mov(al, b'I' as u32).unwrap();
        a.out(0xe9, al).unwrap();
        a.iret().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    poke(&mem, handler, &isr);
    poke(&mem, 0x20 * 4, &[(handler & 0xff) as u8, (handler >> 8) as u8, 0, 0]);
    let (out, console) = run_with(mem, &s, Duration::from_secs(5), |m| m.interrupts().raise(0x20));
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(console.text(), b"IE");
    // The interrupt arrived during HLT: the saved IP is the instruction after it.
    assert_eq!(out.state.regs.rbx & 0xffff, CODE + 2);
}

#[test]
fn sti_shadow_delays_the_interrupt_by_one_instruction() {
    let handler = CODE + 0x100;
    let code = asm(16, |a| {
        a.sti().unwrap();
        a.mov(cx, 1).unwrap();
        a.mov(cx, 2).unwrap();
        a.hlt().unwrap();
    });
    let isr = asm(16, |a| {
        a.mov(dx, cx).unwrap();
        a.iret().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    poke(&mem, handler, &isr);
    poke(&mem, 0x21 * 4, &[(handler & 0xff) as u8, (handler >> 8) as u8, 0, 0]);
    let (out, _) = run_with(mem, &s, Duration::from_secs(5), |m| m.interrupts().raise(0x21));
    // SDM Vol. 2B STI: the instruction after STI (MOV CX, 1) runs before the interrupt.
    assert_eq!(out.state.regs.rdx & 0xffff, 1);
    assert_eq!(out.state.regs.rcx & 0xffff, 2);
}

#[test]
fn self_modifying_code_runs_the_new_bytes() {
    // MOV ECX, imm32 is 5 bytes, so `mov al, imm8` (B0 ib) starts at CODE + 5.
    let imm = CODE + 5 + 1;
    let code = asm(32, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 2).unwrap();
        a.set_label(&mut top).unwrap();
        a.mov(al, 1).unwrap();
        a.add(bl, al).unwrap();
        a.mov(byte_ptr(imm as u32), 5).unwrap();
        a.loop_(top).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rbx & 0xff, 1 + 5);
}

#[test]
fn deadline_stops_jmp_self() {
    let code = asm(16, |a| {
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.jmp(l).unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    let t = Instant::now();
    let (out, _) = run_with(mem, &s, Duration::from_millis(50), |_| {});
    assert_eq!(out.stop, StopReason::Deadline);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(out.instructions.unwrap_or(0) > 0);
}

#[test]
fn single_step_retires_one_instruction_per_run() {
    let code = asm(16, |a| {
        a.mov(ax, 1).unwrap();
        a.out(0xe9, al).unwrap();
        a.inc(ax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    let mut v = InterpVcpu::new(mem, &CpuidProfile::baseline());
    v.set_state(&s).unwrap();
    v.set_single_step(true).unwrap();
    let rip = |e: VcpuExit<'_>| match e {
        VcpuExit::Debug(DebugEvent::SingleStep { rip }) => Some(rip),
        _ => None,
    };
    assert_eq!(rip(v.run().unwrap()), Some(CODE + 3));
    // OUT's I/O exit comes first, then the step completes.
    assert!(matches!(v.run().unwrap(), VcpuExit::IoOut { port: 0xe9, size: 1, data: [1] }));
    assert_eq!(rip(v.run().unwrap()), Some(CODE + 5));
    assert_eq!(rip(v.run().unwrap()), Some(CODE + 6));
    assert_eq!(v.instructions_retired(), Some(3));
    assert_eq!(v.regs().unwrap().rax & 0xffff, 2);
}

/// A port that raises an interrupt whenever it is read.
struct IrqOnRead(duet_core::IrqLine, Arc<Mutex<u32>>);

impl BusDevice for IrqOnRead {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        *self.1.lock().unwrap() += 1;
        data.fill(0x5a);
        self.0.trigger();
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> WriteOutcome {
        WriteOutcome::Continue
    }
}

#[test]
fn in_completes_before_an_interrupt_raised_by_its_own_read() {
    let handler = CODE + 0x100;
    let code = asm(16, |a| {
        a.sti().unwrap();
        a.nop().unwrap();
        a.in_(al, 0x60).unwrap();
        a.hlt().unwrap();
    });
    let isr = asm(16, |a| {
        a.mov(cl, al).unwrap();
        a.iret().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    poke(&mem, handler, &isr);
    poke(&mem, 0x22 * 4, &[(handler & 0xff) as u8, (handler >> 8) as u8, 0, 0]);
    let reads = Arc::new(Mutex::new(0));
    let r2 = reads.clone();
    let (out, _) = run_with(mem, &s, Duration::from_secs(5), move |m| {
        let line = duet_core::IrqLine::new(m.interrupts(), 0x22);
        m.pio.insert(0x60, 1, Arc::new(Mutex::new(IrqOnRead(line, r2)))).unwrap();
    });
    assert_eq!(out.stop, StopReason::Halted);
    // The handler saw AL already loaded, and the port was read once.
    assert_eq!(out.state.regs.rcx & 0xff, 0x5a);
    assert_eq!(*reads.lock().unwrap(), 1);
}

#[test]
fn invalidate_code_picks_up_host_writes() {
    let first = asm(16, |a| {
        a.mov(al, 1).unwrap();
        a.hlt().unwrap();
    });
    let second = asm(16, |a| {
        a.mov(al, 2).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&first);
    let s = real_mode(&mem);
    let mut v = InterpVcpu::new(mem.clone(), &CpuidProfile::baseline());
    v.set_state(&s).unwrap();
    assert!(matches!(v.run().unwrap(), VcpuExit::Hlt));
    poke(&mem, CODE, &second);
    let mut r = v.regs().unwrap();
    r.rip = CODE;
    v.set_regs(&r).unwrap();
    v.invalidate_code();
    assert!(matches!(v.run().unwrap(), VcpuExit::Hlt));
    assert_eq!(v.regs().unwrap().rax & 0xff, 2);
}
