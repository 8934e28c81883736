//! IOPL-sensitive instructions in protected and 64-bit mode: IN/OUT/INS/OUTS through the TSS
//! I/O permission bitmap (SDM Vol. 1 §19.5), CLI/STI at CPL > IOPL (SDM Vol. 2A CLI: #GP(0)
//! without CR4.PVI), POPF that silently keeps IF and IOPL, and IRET's IOPL/IF/VIF/VIP rules.

mod common;

use common::*;
use duet_core::state::rflags::{self, CF, IF, IOPL};
use duet_core::{CpuState, GuestMemory, Segment, StopReason};
use iced_x86::code_asm::*;

/// `s` moved to ring 3: user code (64-bit if `long`), user data in every data register.
fn ring3(mut s: CpuState, long: bool) -> CpuState {
    let seg = |sel: u16| {
        let mut x = Segment::from_descriptor(sel, gdt()[usize::from(sel >> 3)]);
        x.type_ |= 1;
        x
    };
    s.sregs.cs = seg(if long { sel::UCODE64 } else { sel::UCODE32 });
    let d = seg(sel::UDATA);
    (s.sregs.ds, s.sregs.es, s.sregs.fs, s.sregs.gs, s.sregs.ss) = (d, d, d, d, d);
    s
}

/// Gives the TSS a 32-byte I/O bitmap (ports 0–0xFF) at offset 0x68, followed by the 0xFF byte
/// SDM Vol. 1 §19.5.2 asks for; `deny` lists the ports whose bit is set.
fn bitmap(mem: &GuestMemory, s: &mut CpuState, deny: &[u16]) {
    let mut map = [0u8; 33];
    map[32] = 0xff;
    for &p in deny {
        map[usize::from(p / 8)] |= 1 << (p % 8);
    }
    poke(mem, TSS + 0x66, &0x68u16.to_le_bytes());
    poke(mem, TSS + 0x68, &map);
    s.sregs.tr.limit = 0x68 + 32;
}

/// Runs ring-3 32-bit code with RFLAGS `flags`; returns the outcome, the console and the
/// ring-0 frame words [vector, error, …] when it ended in an exception stub.
fn run_user32(
    code: impl FnOnce(&mut CodeAssembler),
    flags: u64,
    deny: Option<&[u16]>,
) -> (duet_core::RunOutcome, Vec<u8>, Vec<u32>) {
    let bytes = asm(32, |a| {
        code(a);
        a.hlt().unwrap();
    });
    let mem = memory(&bytes);
    let mut s = ring3(protected32(&mem), false);
    s.regs.rflags = flags | rflags::FIXED;
    if let Some(d) = deny {
        bitmap(&mem, &mut s, d);
    }
    let (out, console) = run(mem.clone(), &s);
    let frame = (0..2).map(|i| peek32(&mem, (out.state.regs.rsp & 0xffff_ffff) + 4 * i)).collect();
    (out, console.text(), frame)
}

#[test]
fn out_at_cpl3_needs_iopl_or_a_bitmap_that_allows_every_port() {
    let out_al = |a: &mut CodeAssembler| {
        a.mov(al, b'k' as u32).unwrap();
        a.out(0xe9, al).unwrap();
    };
    // IOPL 0, bitmap base 0x68 beyond the limit 0x67 (no bitmap): #GP(0) (SDM Vol. 1 §19.5.2).
    let (out, text, f) = run_user32(out_al, 0, None);
    assert_eq!((stub_vector(&out.state), f[1]), (Some(13), 0));
    assert!(text.is_empty());
    // IOPL 3: allowed without looking at the bitmap.
    let (out, text, _) = run_user32(out_al, IOPL, None);
    assert_eq!((out.stop, text), (StopReason::Halted, b"k".to_vec()));
    // (The HLT after it is privileged: #GP at ring 3.)
    assert_eq!(stub_vector(&out.state), Some(13));
    // A bitmap whose bit for 0xE9 is clear allows it; one whose bit is set refuses it.
    let (_, text, _) = run_user32(out_al, 0, Some(&[0x80, 0xe8, 0xea]));
    assert_eq!(text, b"k");
    let (out, text, f) = run_user32(out_al, 0, Some(&[0xe9]));
    assert_eq!((stub_vector(&out.state), f[1], text.is_empty()), (Some(13), 0, true));
    // A word access checks the bits of both ports: 0xE9 allowed, 0xEA denied → #GP(0).
    let (out, _, _) = run_user32(
        |a| {
            a.mov(dx, 0xe9).unwrap();
            a.out(dx, ax).unwrap();
        },
        0,
        Some(&[0xea]),
    );
    assert_eq!(stub_vector(&out.state), Some(13));
    // A port whose bitmap bytes lie beyond the TSS limit: #GP(0).
    let (out, _, _) = run_user32(
        |a| {
            a.mov(dx, 0x3f8).unwrap();
            a.in_(al, dx).unwrap();
        },
        0,
        Some(&[]),
    );
    assert_eq!(stub_vector(&out.state), Some(13));
}

#[test]
fn ins_and_outs_use_the_same_bitmap_check() {
    // OUTSB then INSB on port 0xE9 (allowed), then OUTSB on 0x80 (denied).
    let (out, text, _) = run_user32(
        |a| {
            a.mov(byte_ptr(0x9000), b'z' as u32).unwrap();
            a.mov(esi, 0x9000).unwrap();
            a.mov(edi, 0x9001).unwrap();
            a.mov(dx, 0xe9).unwrap();
            a.outsb().unwrap();
            a.insb().unwrap();
            a.mov(dx, 0x80).unwrap();
            a.outsb().unwrap();
        },
        0,
        Some(&[0x80]),
    );
    assert_eq!(text, b"z");
    assert_eq!(stub_vector(&out.state), Some(13));
    // INSB read the console device (reads 0) and advanced EDI.
    assert_eq!(out.state.regs.rdi, 0x9002);
}

#[test]
fn long_mode_ring3_in_uses_the_64bit_tss_bitmap() {
    // The 64-bit TSS keeps the I/O map base at offset 0x66 too (SDM Vol. 3A §9.7, Figure 9-11).
    for (deny, expect) in [(&[0x70u16][..], None), (&[0xe9][..], Some(13))] {
        let code = asm(64, |a| {
            a.mov(al, b'L' as u32).unwrap();
            a.out(0xe9, al).unwrap();
            a.int3().unwrap();
        });
        let mem = memory(&code);
        let mut s = ring3(long64(&mem), true);
        bitmap(&mem, &mut s, deny);
        let (out, console) = run(mem, &s);
        let v = stub_vector(&out.state);
        match expect {
            // INT3 through a DPL-0 gate from ring 3 is #GP too; the OUT ran first.
            None => assert_eq!((v, console.text()), (Some(13), b"L".to_vec())),
            Some(e) => assert_eq!((v, console.text()), (Some(e), vec![])),
        }
    }
}

#[test]
fn a_page_fault_on_the_bitmap_is_a_page_fault() {
    // TSS at 0x5F00 with the bitmap at 0x6000, whose page is not present: reading the bitmap is
    // an implicit supervisor read, so #PF with error code 0 and CR2 = the bitmap byte.
    let tss = 0x5f00u64;
    let code = asm(32, |a| {
        a.mov(dx, 0x48).unwrap();
        a.in_(al, dx).unwrap();
    });
    let mem = memory(&code);
    let mut s = ring3(paging32(&mem, protected32(&mem)), false);
    poke(&mem, tss + 4, &(STACK0 as u32).to_le_bytes());
    poke(&mem, tss + 8, &u32::from(sel::DATA).to_le_bytes());
    poke(&mem, tss + 0x66, &0x100u16.to_le_bytes());
    s.sregs.tr.base = tss;
    s.sregs.tr.limit = 0x100 + 0x2000;
    set_pte32(&mem, 0x6000, 0);
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(stub_vector(&out.state), Some(14));
    assert_eq!(peek32(&mem, out.state.regs.rsp + 4), 0);
    assert_eq!(out.state.sregs.cr2, 0x6000 + 0x48 / 8);
}

#[test]
fn cli_sti_fault_above_iopl_and_popf_keeps_if_and_iopl() {
    // CPL 3, IOPL 0: CLI is #GP(0) (SDM Vol. 2A CLI, CR4.PVI = 0).
    let (out, _, f) = run_user32(|a| a.cli().unwrap(), IF, None);
    assert_eq!((stub_vector(&out.state), f[1]), (Some(13), 0));
    let (out, _, _) = run_user32(|a| a.sti().unwrap(), 0, None);
    assert_eq!(stub_vector(&out.state), Some(13));
    // CPL 3, IOPL 3: CLI clears IF (then HLT is #GP, its frame holds the flags).
    let (out, _, _) = run_user32(
        |a| {
            a.cli().unwrap();
            a.pushfd().unwrap();
            a.pop(eax).unwrap();
        },
        IF | IOPL,
        None,
    );
    assert_eq!(out.state.regs.rax & (IF | IOPL), IOPL);
    // CPL 3, IOPL 0: POPFD of CF | IOPL with IF clear changes CF only, without a fault (SDM
    // Vol. 2B POPF: "the IF flag ... and the IOPL field are not modified").
    let (out, _, _) = run_user32(
        |a| {
            a.push((CF | IOPL) as u32 | 2).unwrap();
            a.popfd().unwrap();
            a.pushfd().unwrap();
            a.pop(eax).unwrap();
        },
        IF,
        None,
    );
    assert_eq!(out.state.regs.rax & (CF | IF | IOPL), CF | IF);
}

#[test]
fn iret_at_cpl0_loads_iopl_vif_vip_and_popf_does_not() {
    // SDM Vol. 2A IRET (return to the same level, CPL 0): IOPL, IF, VIF and VIP come from the
    // image. SDM Vol. 2B POPF (protected mode): VIF and VIP are unaffected.
    let img = (rflags::VIF | rflags::VIP | (2 << 12) | CF) as u32 | 2;
    let back = CODE + 0x100;
    let code = asm(32, |a| {
        a.push(img).unwrap();
        a.popfd().unwrap();
        a.pushfd().unwrap();
        a.pop(ebx).unwrap();
        a.push(img).unwrap();
        a.push(u32::from(sel::CODE32)).unwrap();
        a.push(back as u32).unwrap();
        a.iretd().unwrap();
    });
    let after = asm(32, |a| {
        a.pushfd().unwrap();
        a.pop(ecx).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, back, &after);
    let s = protected32(&mem);
    let (out, _) = run(mem, &s);
    let vif_vip = rflags::VIF | rflags::VIP;
    assert_eq!(out.state.regs.rbx & (vif_vip | IOPL | CF), (2 << 12) | CF);
    assert_eq!(out.state.regs.rcx & (vif_vip | IOPL | CF), vif_vip | (2 << 12) | CF);
}

#[test]
fn iret_at_cpl3_keeps_iopl_and_if_above_iopl() {
    // Ring 3, IOPL 0: IRETD to ring 3 with IOPL 3 and IF clear in the image changes neither.
    let back = CODE + 0x100;
    let code = asm(32, |a| {
        a.push(u32::from(sel::UDATA)).unwrap();
        a.push(0x5_0000).unwrap();
        a.push(IOPL as u32 | 2).unwrap();
        a.push(u32::from(sel::UCODE32)).unwrap();
        a.push(back as u32).unwrap();
        a.iretd().unwrap();
    });
    let after = asm(32, |a| {
        a.pushfd().unwrap();
        a.pop(eax).unwrap();
        a.int3().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, back, &after);
    let mut s = ring3(protected32(&mem), false);
    s.regs.rflags = IF | rflags::FIXED;
    let (out, _) = run(mem, &s);
    assert_eq!(out.state.regs.rax & (IF | IOPL), IF);
}

/// Builds the ring-3 32-bit guest of [`run_user32`] without running it.
fn build_user32(
    code: fn(&mut CodeAssembler),
    flags: u64,
    deny: Option<&[u16]>,
) -> (std::sync::Arc<GuestMemory>, CpuState) {
    let bytes = asm(32, |a| {
        code(a);
        a.hlt().unwrap();
    });
    let mem = memory(&bytes);
    let mut s = ring3(protected32(&mem), false);
    s.regs.rflags = flags | rflags::FIXED;
    if let Some(d) = deny {
        bitmap(&mem, &mut s, d);
    }
    (mem, s)
}

#[test]
fn iopl_and_bitmap_outcomes_match_kvm() {
    // Protected mode without paging, exceptions from ring 3: what this host's KVM runs right
    // (DEVELOPERS.md). Each case ends in an exception stub; vector, error code, faulting EIP and
    // the console must agree.
    type Emit = fn(&mut CodeAssembler);
    let out_e9: Emit = |a| {
        a.mov(al, b'k' as u32).unwrap();
        a.out(0xe9, al).unwrap();
    };
    let out_word: Emit = |a| {
        a.mov(dx, 0xe9).unwrap();
        a.out(dx, ax).unwrap();
    };
    let cli: Emit = |a| a.cli().unwrap();
    let popf: Emit = |a| {
        a.push((CF | IOPL) as u32 | 2).unwrap();
        a.popfd().unwrap();
        a.pushfd().unwrap();
        a.pop(eax).unwrap();
    };
    let cases: [(&str, Emit, u64, Option<&[u16]>); 7] = [
        ("out, no bitmap", out_e9, 0, None),
        ("out, IOPL 3", out_e9, IOPL, None),
        ("out, allowed", out_e9, 0, Some(&[0x80, 0xe8, 0xea])),
        ("out, denied", out_e9, 0, Some(&[0xe9])),
        ("out word, half denied", out_word, 0, Some(&[0xea])),
        ("cli above IOPL", cli, IF, None),
        ("popfd above IOPL", popf, IF, None),
    ];
    for (name, code, flags, deny) in cases {
        let Some((kout, kcon, kmem)) = run_kvm(|| build_user32(code, flags, deny)) else { return };
        if let duet_core::StopReason::CannotRun(why) = &kout.stop {
            println!("{name}: KVM half skipped: {}", why.reason);
            continue;
        }
        let (mem, s) = build_user32(code, flags, deny);
        let (iout, icon) = run(mem.clone(), &s);
        let frame = |m: &GuestMemory, o: &duet_core::RunOutcome| {
            (0..3).map(|i| peek32(m, (o.state.regs.rsp & 0xffff_ffff) + 4 * i)).collect::<Vec<_>>()
        };
        assert_eq!(stub_vector(&iout.state), stub_vector(&kout.state), "{name}");
        assert_eq!(frame(&mem, &iout), frame(&kmem, &kout), "{name}");
        assert_eq!(icon.text(), kcon.text(), "{name}");
        assert_eq!(iout.state.regs.rax & 0xffff_ffff, kout.state.regs.rax & 0xffff_ffff, "{name}");
    }
}

#[test]
fn rep_ins_and_outs_with_a_zero_count_still_check_the_bitmap() {
    // SDM Vol. 1 §19.5.1: the permission check is the instruction's, made before any iteration;
    // KVM raises #GP(0) for `rep insb` with ECX = 0 at CPL 3 (fixtures/corpus
    // rep-ins-zero-count-iopl.json). Allowed ports and a zero count do nothing.
    // (The HLT after the code faults at CPL 3 too: EBX = 1 says the string instruction passed.)
    for (port, ins, passes) in [(0x80u16, true, false), (0x80, false, false), (0xe9, true, true)] {
        let (out, _, frame) = run_user32(
            |a| {
                a.mov(ecx, 0).unwrap();
                a.mov(edi, 0x9000).unwrap();
                a.mov(esi, 0x9000).unwrap();
                a.mov(dx, u32::from(port)).unwrap();
                if ins {
                    a.rep().insb().unwrap();
                } else {
                    a.rep().outsb().unwrap();
                }
                a.mov(ebx, 1).unwrap();
            },
            0,
            Some(&[0x80]),
        );
        assert_eq!(stub_vector(&out.state), Some(13), "port {port:#x}, ins {ins}");
        assert_eq!((frame[0], frame[1]), (13, 0), "#GP(0)");
        assert_eq!(out.state.regs.rbx == 1, passes, "port {port:#x}, ins {ins}");
        assert_eq!((out.state.regs.rdi, out.state.regs.rsi), (0x9000, 0x9000));
    }
}
