//! Virtual interrupts: CR4.PVI at CPL 3 and CR4.VME in virtual-8086 mode (SDM Vol. 3A §20.3
//! and §20.4, Table 20-2; the CLI, STI, PUSHF, POPF, IRET and INT n pages of Vol. 2). This
//! host's KVM runs no virtual-8086 guests we could trust, so the SDM decides.

mod common;

use common::*;
use duet_core::state::rflags::{self, CF, IF, IOPL, TF, VIF, VIP, VM};
use duet_core::{CpuState, GuestMemory, RunOutcome, Segment};
use iced_x86::code_asm::*;

/// CR4.VME and CR4.PVI.
const CR4_VME: u64 = 1;
const CR4_PVI: u64 = 2;
/// Where the guests store what they observed.
const OUT: u64 = 0x9000;
/// A virtual-8086 interrupt handler.
const HANDLER: u64 = 0x9100;

/// Virtual-8086 mode at 0000:CODE, SS:SP = 0000:7000, RFLAGS = VM | `flags`, over the 32-bit
/// protected-mode tables (exceptions go to the ring-0 stubs).
fn v86(mem: &GuestMemory, flags: u64) -> CpuState {
    let mut s = protected32(mem);
    let seg = |code| Segment { dpl: 3, ..Segment::real_mode(0, code) };
    s.sregs.cs = seg(true);
    let d = seg(false);
    (s.sregs.ds, s.sregs.es, s.sregs.fs, s.sregs.gs, s.sregs.ss) = (d, d, d, d, d);
    s.regs.rsp = 0x7000;
    s.regs.rflags = VM | flags | rflags::FIXED;
    s.sregs.cr4 |= CR4_VME;
    s
}

/// The ring-0 frame words (32-bit) above the stub's vector: [vector, error?, EIP, …].
fn frame(mem: &GuestMemory, out: &RunOutcome, n: u64) -> Vec<u64> {
    (0..n).map(|i| u64::from(peek32(mem, out.state.regs.rsp + 4 * i))).collect()
}

/// The 16-bit words the guest stored from [`OUT`].
fn words(mem: &GuestMemory, n: u64) -> Vec<u64> {
    (0..n).map(|i| u64::from(peek32(mem, OUT + 2 * i) & 0xffff)).collect()
}

#[test]
fn pvi_cli_sti_at_cpl3_change_vif_and_sti_with_vip_faults() {
    // SDM Vol. 2A CLI / Vol. 2B STI: CPL 3 > IOPL with CR4.PVI: CLI clears VIF, STI sets it
    // unless VIP = 1 (#GP(0)). IF itself never changes.
    for vip in [false, true] {
        let code = asm(32, |a| {
            a.cli().unwrap();
            a.pushfd().unwrap();
            a.pop(dword_ptr(OUT)).unwrap();
            a.sti().unwrap();
            a.pushfd().unwrap();
            a.pop(dword_ptr(OUT + 4)).unwrap();
            a.int3().unwrap(); // ends the test: a DPL-0 gate from ring 3 is #GP
        });
        let mem = memory(&code);
        let mut s = protected32(&mem);
        let seg = |sel: u16| {
            let mut x = Segment::from_descriptor(sel, gdt()[usize::from(sel >> 3)]);
            x.type_ |= 1;
            x
        };
        s.sregs.cs = seg(sel::UCODE32);
        let d = seg(sel::UDATA);
        (s.sregs.ds, s.sregs.es, s.sregs.ss) = (d, d, d);
        s.sregs.cr4 |= CR4_PVI;
        s.regs.rflags = IF | VIF | rflags::FIXED | if vip { VIP } else { 0 };
        s.regs.rsp = 0x5_0000;
        let (out, _) = run(mem.clone(), &s);
        assert_eq!(peek32(&mem, OUT) as u64 & (IF | VIF), IF, "CLI cleared VIF only");
        let f = frame(&mem, &out, 3);
        if vip {
            // #GP(0) at the STI (CLI 1 byte, PUSHFD 1, POP m32 6).
            assert_eq!((stub_vector(&out.state), f[1], f[2]), (Some(13), 0, CODE + 8));
        } else {
            assert_eq!(peek32(&mem, OUT + 4) as u64 & (IF | VIF), IF | VIF);
            assert_eq!((stub_vector(&out.state), f[1]), (Some(13), 3 * 8 + 2));
        }
    }
}

#[test]
fn vme_cli_sti_pushf_popf_use_vif() {
    let code = asm(16, |a| {
        a.cli().unwrap();
        a.pushf().unwrap(); // IF ← VIF (0), IOPL reads 3
        a.pop(word_ptr(OUT)).unwrap();
        a.sti().unwrap();
        a.pushf().unwrap();
        a.pop(word_ptr(OUT + 2)).unwrap();
        a.push(CF as i32).unwrap(); // IF = 0, TF = 0: VIF ← 0, CF ← 1
        a.popf().unwrap();
        a.pushf().unwrap();
        a.pop(word_ptr(OUT + 4)).unwrap();
        a.pushfd().unwrap(); // 32-bit PUSHF with IOPL < 3: #GP(0) even with VME
    });
    let mem = memory(&code);
    let s = v86(&mem, IF | VIF);
    let (out, _) = run(mem.clone(), &s);
    let w = words(&mem, 3);
    assert_eq!(w[0] & (IF | IOPL), IOPL);
    assert_eq!(w[1] & (IF | IOPL), IF | IOPL);
    assert_eq!(w[2] & (IF | IOPL | CF), IOPL | CF);
    // The #GP frame from virtual-8086 mode: [vector, error, EIP, CS, EFLAGS, …]; EFLAGS keeps
    // the real IF = 1 and VIF = 0 from the POPF.
    let f = frame(&mem, &out, 5);
    assert_eq!((stub_vector(&out.state), f[1]), (Some(13), 0));
    assert_eq!(f[2], CODE + code.len() as u64 - 2);
    assert_eq!(f[4] & (IF | VIF | VM), IF | VM);
}

#[test]
fn vme_popf_faults_on_tf_or_on_if_with_vip() {
    // SDM Vol. 2B POPF (virtual-8086 mode, CR4.VME, IOPL < 3): #GP(0) when the image sets TF,
    // or sets IF while VIP = 1.
    for (image, vip) in [(TF, false), (IF, true), (IF, false)] {
        let code = asm(16, |a| {
            a.push(image as i32).unwrap();
            a.popf().unwrap();
            a.hlt().unwrap(); // privileged: #GP(0) one instruction later
        });
        let mem = memory(&code);
        let s = v86(&mem, if vip { VIP } else { 0 });
        let (out, _) = run(mem.clone(), &s);
        let f = frame(&mem, &out, 5);
        let popf_at = CODE + 3;
        let faulted_at = if image == IF && !vip { popf_at + 1 } else { popf_at };
        assert_eq!((stub_vector(&out.state), f[2]), (Some(13), faulted_at), "{image:#x} vip {vip}");
        if faulted_at != popf_at {
            assert_eq!(f[4] & VIF, VIF, "VIF ← the image's IF");
        }
    }
}

#[test]
fn vme_int_n_is_redirected_through_the_bitmap() {
    // Redirection bitmap at TSS + 0x68 (32 bytes below the I/O map base 0x88): vector 0x21's
    // bit is clear (redirected to the 8086 IVT), 0x22's is set (IOPL 0: #GP(0)).
    let code = asm(16, |a| {
        a.cli().unwrap(); // VIF ← 0, so the handler sees IF = 0 in the image
        a.int(0x21).unwrap();
        a.mov(word_ptr(OUT + 4), bx).unwrap();
        a.int(0x22).unwrap();
    });
    let handler = asm(16, |a| {
        a.mov(bp, sp).unwrap();
        a.mov(ax, word_ptr(bp + 4)).unwrap(); // pushed FLAGS
        a.mov(word_ptr(OUT), ax).unwrap();
        a.mov(ax, word_ptr(bp)).unwrap(); // pushed IP
        a.mov(word_ptr(OUT + 2), ax).unwrap();
        a.mov(bx, 0x1234).unwrap();
        a.iret().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, HANDLER, &handler);
    let mut s = v86(&mem, IF | VIF);
    // IVT entry 0x21 of the virtual-8086 task (linear 0x84): 0000:HANDLER.
    poke(&mem, 0x21 * 4, &(HANDLER as u32).to_le_bytes());
    poke(&mem, TSS + 0x66, &0x88u16.to_le_bytes());
    let mut redirect = [0u8; 32];
    redirect[0x22 / 8] |= 1 << (0x22 % 8);
    poke(&mem, TSS + 0x68, &redirect);
    s.sregs.tr.limit = 0x88;
    let (out, _) = run(mem.clone(), &s);
    let w = words(&mem, 3);
    // SDM Vol. 3A Table 20-2 method 6: FLAGS pushed with IF = VIF (0) and IOPL = 3; the return
    // IP is the instruction after INT 0x21 (CLI 1 + INT 2 bytes).
    assert_eq!(w[0] & (IF | IOPL), IOPL);
    assert_eq!((w[1], w[2]), (CODE + 3, 0x1234));
    // Method 5: bit set with IOPL < 3 → #GP(0) at the INT.
    let f = frame(&mem, &out, 3);
    assert_eq!((stub_vector(&out.state), f[1], f[2]), (Some(13), 0, CODE + 3 + 4));
}

#[test]
fn vme_int_n_with_iopl3_and_bit_set_goes_to_the_protected_mode_idt() {
    // Method 3: IOPL = 3 and the bit set → the protected-mode handler (gate DPL 3 needed).
    let code = asm(16, |a| {
        a.int(0x40).unwrap();
    });
    let mem = memory(&code);
    let mut s = v86(&mem, IOPL | IF);
    poke(&mem, TSS + 0x66, &0x88u16.to_le_bytes());
    poke(&mem, TSS + 0x68, &[0xff; 32]);
    s.sregs.tr.limit = 0x88;
    let gate = peek64(&mem, IDT + 0x40 * 8) | (3 << 45);
    poke(&mem, IDT + 0x40 * 8, &gate.to_le_bytes());
    let (out, _) = run(mem.clone(), &s);
    let f = frame(&mem, &out, 4);
    // Trap-style frame from virtual-8086 mode: [vector, EIP after INT, CS, EFLAGS with VM].
    assert_eq!((stub_vector(&out.state), f[1]), (Some(0x40), CODE + 2));
    assert_ne!(f[3] & VM, 0);
}
