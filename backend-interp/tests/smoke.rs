//! Random-bytes smoke test: whatever the bytes, the interpreter never panics and every run ends
//! in a terminal event (a fixed-seed xorshift, so a failure reproduces).

mod common;

use std::time::{Duration, Instant};

use common::*;
use duet_core::{CpuState, CpuidProfile, GuestMemory, Machine, RunOptions, Vcpu};
use duet_interp::InterpVcpu;

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        // Marsaglia xorshift64.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Sequences per mode; `DUET_SMOKE_SEQUENCES` raises it for a longer soak.
fn sequences() -> usize {
    std::env::var("DUET_SMOKE_SEQUENCES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

fn smoke(name: &str, setup: fn(&GuestMemory) -> CpuState, seed: u64) {
    let mem = memory(&[]);
    let mut rng = XorShift(seed);
    let start = Instant::now();
    let mut deadlines = 0u64;
    // Steps run by the sequences the deadline stopped.
    let mut deadline_steps = 0u64;
    let n = sequences();
    for i in 0..n {
        let mut state = setup(&mem);
        // Random general registers (except RSP): half small (inside RAM), half anything, so
        // memory operands reach RAM, MMIO, unmapped and non-canonical addresses.
        for r in [0usize, 1, 2, 3, 5, 6, 7] {
            let v = rng.next();
            let v = if v & 1 == 0 { v % RAM } else { v };
            let mut g = state.regs.gprs();
            g[r] = v;
            state.regs.set_gprs(&g);
        }
        let mut bytes = [0u8; 15];
        for b in bytes.iter_mut() {
            *b = rng.next() as u8;
        }
        poke(&mem, CODE, &bytes);
        // Falling off the end lands on HLT.
        poke(&mem, CODE + 15, &[0xf4; 64]);
        let mut vcpu = InterpVcpu::new(mem.clone(), &CpuidProfile::baseline());
        vcpu.set_state(&state).unwrap();
        let mut machine = Machine::with_vcpu(mem.clone(), vcpu);
        let out = machine.run(&RunOptions { timeout: Duration::from_millis(10) }).unwrap();
        let steps = machine.vcpu().steps();
        assert!(out.exits > 0, "{name} #{i}: {bytes:02x?} ended without an exit");
        assert!(
            steps >= out.instructions.unwrap_or(0),
            "{name} #{i}: {bytes:02x?} retired more instructions than it stepped"
        );
        if out.stop == duet_core::StopReason::Deadline {
            deadlines += 1;
            deadline_steps += steps;
        }
    }
    eprintln!("{name}: {n} sequences in {:?}, {deadlines} hit the deadline", start.elapsed());
    // The runs the deadline stopped were running (loops), not stalled: thousands of steps each
    // (the run loop looks at the clock every 4096 steps, or after an exit). Taken over all of
    // them, so that one run starved of the CPU by a loaded host cannot fail the test.
    assert!(
        deadline_steps >= 64 * deadlines,
        "{name}: {deadlines} runs hit the deadline after {deadline_steps} steps in all"
    );
}

#[test]
fn random_bytes_real_mode_never_panic() {
    smoke("real", real_mode, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn random_bytes_protected_mode_never_panic() {
    smoke("protected32", protected32, 0xdead_beef_cafe_f00d);
}

/// Virtual-8086 mode over the protected-mode tables: CS:IP = 0800:0000 (linear `CODE`).
fn v86(mem: &GuestMemory) -> CpuState {
    let mut s = protected32(mem);
    let seg =
        |sel: u16, code: bool| duet_core::Segment { dpl: 3, ..duet_core::Segment::real_mode(sel, code) };
    s.sregs.cs = seg((CODE >> 4) as u16, true);
    (s.sregs.ds, s.sregs.es, s.sregs.fs, s.sregs.gs, s.sregs.ss) =
        (seg(0, false), seg(0, false), seg(0, false), seg(0, false), seg(0, false));
    s.regs.rip = 0;
    s.regs.rsp = 0x7000;
    s.regs.rflags |= duet_core::state::rflags::VM;
    s
}

#[test]
fn random_bytes_virtual_8086_mode_never_panic() {
    smoke("v86", v86, 0x5555_aaaa_0f0f_f0f0);
}

#[test]
fn random_bytes_long_mode_never_panic() {
    smoke("long64", long64, 0x0123_4567_89ab_cdef);
}
