//! Paging-structure caches: PAE's PDPTE registers (loaded with CR3, #GP on reserved bits; SDM
//! Vol. 3A §4.4.1) and global pages (kept across CR3 writes with CR4.PGE, dropped by INVLPG
//! and by toggling CR4.PGE; SDM Vol. 3A §4.10.2.4 and §4.10.4.1). This host's KVM cannot run
//! PAE paging in protected mode (DEVELOPERS.md), so the SDM decides.

mod common;

use common::*;
use duet_core::state::ctrl;
use duet_core::StopReason;
use iced_x86::code_asm::*;

/// PAE page-directory-pointer table (32-byte aligned).
const PDPT: u64 = 0x2_0000;
/// Page directory of the first GiB: 2 MiB identity pages.
const PD: u64 = 0x2_1000;
/// The same, except that 2–4 MiB maps physical 0–2 MiB.
const PD_ALT: u64 = 0x2_3000;
/// Value the host stores at physical 2 MiB (and at the first page of each test).
const A: u32 = 0xaaaa_0001;
/// Value the host stores at physical 0 (and at the second page of each test).
const B: u32 = 0xbbbb_0002;

#[test]
fn pae_pdptes_are_loaded_with_cr3_and_reserved_bits_are_gp() {
    let code = asm(32, |a| {
        a.mov(eax, cr4).unwrap();
        a.or(eax, ctrl::CR4_PAE as u32).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(eax, PDPT as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, ctrl::CR0_PG as u32).unwrap();
        a.mov(cr0, eax).unwrap(); // turning PAE paging on loads the PDPTEs
        a.mov(ebx, dword_ptr(0x20_0000)).unwrap(); // A
                                                   // Repoint PDPTE 0 in memory: the PDPTE register is not reloaded by INVLPG.
        a.mov(dword_ptr(PDPT), (PD_ALT | 1) as u32).unwrap();
        a.invlpg(dword_ptr(0x20_0000)).unwrap();
        a.mov(ecx, dword_ptr(0x20_0000)).unwrap(); // still A
        a.mov(eax, cr3).unwrap();
        a.mov(cr3, eax).unwrap(); // MOV to CR3 under PAE paging reloads them
        a.mov(edx, dword_ptr(0x20_0000)).unwrap(); // B
                                                   // Back to the first PD in memory; toggling CR4.PGE reloads the PDPTEs too.
        a.mov(dword_ptr(PDPT), (PD | 1) as u32).unwrap();
        a.mov(eax, cr4).unwrap();
        a.xor(eax, ctrl::CR4_PGE as u32).unwrap();
        a.mov(cr4, eax).unwrap();
        a.mov(esi, dword_ptr(0x20_0000)).unwrap(); // A
                                                   // A present PDPTE with reserved bit 1 set: MOV to CR3 is #GP(0) and loads nothing.
        a.mov(dword_ptr(PDPT + 16), 0x3).unwrap();
        a.mov(eax, PDPT as u32).unwrap();
        a.mov(cr3, eax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, PDPT, &(PD | 1).to_le_bytes());
    for i in 0..512u64 {
        poke(&mem, PD + 8 * i, &((i << 21) | 0x83).to_le_bytes());
        let alt = if i == 1 { 0 } else { i << 21 };
        poke(&mem, PD_ALT + 8 * i, &(alt | 0x83).to_le_bytes());
    }
    poke(&mem, 0x20_0000, &A.to_le_bytes());
    poke(&mem, 0, &B.to_le_bytes());
    let s = protected32(&mem);
    let (out, _) = run(mem.clone(), &s);
    let r = &out.state.regs;
    assert_eq!((r.rbx as u32, r.rcx as u32, r.rdx as u32, r.rsi as u32), (A, A, B, A));
    assert_eq!(stub_vector(&out.state), Some(13));
    assert_eq!(peek32(&mem, out.state.regs.rsp + 4), 0, "error code");
    // The faulting MOV left CR3 as it was.
    assert_eq!(out.state.sregs.cr3, PDPT);
}

#[test]
fn enabling_pae_paging_with_a_bad_pdpte_is_gp() {
    // SDM Vol. 3A §4.4.1: the MOV to CR0 that turns PAE paging on loads the PDPTEs; a present
    // one with reserved bits (here bit 5) is #GP(0) and paging stays off.
    let code = asm(32, |a| {
        a.mov(eax, cr0).unwrap();
        a.or(eax, ctrl::CR0_PG as u32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    poke(&mem, PDPT + 8, &(PD | 0x21).to_le_bytes());
    let mut s = protected32(&mem);
    s.sregs.cr4 |= ctrl::CR4_PAE;
    s.sregs.cr3 = PDPT;
    let (out, _) = run(mem, &s);
    assert_eq!(stub_vector(&out.state), Some(13));
    assert_eq!(out.state.sregs.cr0 & ctrl::CR0_PG, 0);
}

#[test]
fn global_pages_survive_cr3_writes_until_invlpg_or_a_pge_toggle() {
    // The SDM lets a processor keep global translations across MOV to CR3 (§4.10.4.1); the
    // interpreter does, as hardware with room in its TLB does. Page 0x30_0000 is global,
    // 0x30_2000 is not; the guest repoints both PTEs at 0x30_1000 (holding B).
    let pte = |page: u64| PT + 0x1000 + (page >> 12) * 4;
    let code = asm(32, |a| {
        a.mov(eax, dword_ptr(0x30_0000)).unwrap(); // fills the TLB: A
        a.mov(eax, dword_ptr(0x30_2000)).unwrap();
        a.mov(dword_ptr(pte(0x30_0000)), 0x30_1000 | 0x107).unwrap();
        a.mov(dword_ptr(pte(0x30_2000)), 0x30_1000 | 0x7).unwrap();
        a.mov(eax, cr3).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ebx, dword_ptr(0x30_0000)).unwrap(); // global: still A
        a.mov(ecx, dword_ptr(0x30_2000)).unwrap(); // not global: B
        a.invlpg(dword_ptr(0x30_0000)).unwrap();
        a.mov(edx, dword_ptr(0x30_0000)).unwrap(); // B
        a.mov(dword_ptr(pte(0x30_0000)), 0x30_0000 | 0x107).unwrap();
        a.mov(eax, cr3).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(esi, dword_ptr(0x30_0000)).unwrap(); // the global B stays
        a.mov(eax, cr4).unwrap();
        a.xor(eax, ctrl::CR4_PGE as u32).unwrap();
        a.mov(cr4, eax).unwrap(); // clearing PGE flushes everything (§4.10.4.1)
        a.mov(edi, dword_ptr(0x30_0000)).unwrap(); // A
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let mut s = paging32(&mem, protected32(&mem));
    s.sregs.cr4 |= ctrl::CR4_PGE;
    set_pte32(&mem, 0x30_0000, 0x30_0000 | 0x107);
    poke(&mem, 0x30_0000, &A.to_le_bytes());
    poke(&mem, 0x30_1000, &B.to_le_bytes());
    poke(&mem, 0x30_2000, &A.to_le_bytes());
    let (out, _) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted);
    let r = &out.state.regs;
    assert_eq!((r.rbx as u32, r.rcx as u32, r.rdx as u32), (A, B, B));
    assert_eq!((r.rsi as u32, r.rdi as u32), (B, A));
}

#[test]
fn without_pge_the_g_bit_is_ignored() {
    // CR4.PGE = 0: G has no effect, a CR3 write drops the translation (SDM Vol. 3A §4.10.2.4).
    let pte = PT + 0x1000 + (0x30_0000 >> 12) * 4;
    let code = asm(32, |a| {
        a.mov(eax, dword_ptr(0x30_0000)).unwrap();
        a.mov(dword_ptr(pte), 0x30_1000 | 0x107).unwrap();
        a.mov(eax, cr3).unwrap();
        a.mov(cr3, eax).unwrap();
        a.mov(ebx, dword_ptr(0x30_0000)).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = paging32(&mem, protected32(&mem));
    set_pte32(&mem, 0x30_0000, 0x30_0000 | 0x107);
    poke(&mem, 0x30_0000, &A.to_le_bytes());
    poke(&mem, 0x30_1000, &B.to_le_bytes());
    let (out, _) = run(mem, &s);
    assert_eq!(out.state.regs.rbx as u32, B);
}
