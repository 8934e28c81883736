//! Paging details: NX (I/D in the error code), CR0.WP, 4 MiB PSE pages, 1 GiB pages, and the
//! accessed/dirty bits (SDM Vol. 3A §4.3, §4.5, §4.6, §4.7, §4.8).

mod common;

use common::*;
use duet_core::state::ctrl;
use duet_core::StopReason;
use iced_x86::code_asm::*;

const PATTERN: u32 = 0xfeed_f00d;

#[test]
fn fetch_from_nx_page_faults_with_id_bit() {
    let code = asm(64, |a| {
        a.mov(rax, 0x20_0000u64).unwrap();
        a.jmp(rax).unwrap();
    });
    let mem = memory(&code);
    let mut s = long64(&mem);
    s.sregs.efer |= ctrl::EFER_NXE;
    // PD entry 1 maps 2–4 MiB; set XD (bit 63).
    let pde = peek64(&mem, PT + 0x2000 + 8) | (1 << 63);
    poke(&mem, PT + 0x2000 + 8, &pde.to_le_bytes());
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.state.regs.rip, STUBS + 14 * 8 + 6);
    let q = |i: u64| peek64(&mem, out.state.regs.rsp + 8 * i);
    // Error code: P (present, protection) | I/D (instruction fetch) = 0x11; RIP = the target.
    assert_eq!((q(0), q(1), q(2)), (14, 0x11, 0x20_0000));
    assert_eq!(out.state.sregs.cr2, 0x20_0000);
}

#[test]
fn cr0_wp_makes_read_only_pages_fault_for_the_supervisor() {
    let code = asm(32, |a| {
        a.mov(dword_ptr(0x30_2000), 1).unwrap();
        a.hlt().unwrap();
    });
    for wp in [false, true] {
        let mem = memory(&code);
        let mut s = paging32(&mem, protected32(&mem));
        set_pte32(&mem, 0x30_2000, 0x30_2000 | 0x5); // present, user, read-only
        if wp {
            s.sregs.cr0 |= ctrl::CR0_WP;
        }
        let (out, _) = run(mem.clone(), &s);
        if wp {
            assert_eq!(out.state.regs.rip, STUBS + 14 * 8 + 6);
            // P | W: a supervisor write to a present read-only page.
            assert_eq!(peek32(&mem, out.state.regs.rsp + 4), 0b011);
        } else {
            assert_eq!(out.stop, StopReason::Halted);
            assert_eq!(peek32(&mem, 0x30_2000), 1);
        }
    }
}

#[test]
fn pse_4mib_page_maps_and_gets_accessed_and_dirty_bits() {
    let code = asm(32, |a| {
        a.mov(eax, dword_ptr(0x40_9000)).unwrap();
        a.mov(dword_ptr(0x40_9004), eax).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let mut s = paging32(&mem, protected32(&mem));
    s.sregs.cr4 |= ctrl::CR4_PSE;
    // PDE 1 (linear 4–8 MiB) → physical 0 as a 4 MiB page: P | RW | PS.
    poke(&mem, PT + 4, &0x83u32.to_le_bytes());
    poke(&mem, 0x9000, &PATTERN.to_le_bytes());
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax, u64::from(PATTERN));
    assert_eq!(peek32(&mem, 0x9004), PATTERN);
    // Accessed (bit 5) and dirty (bit 6) are now set in the PDE that maps the page.
    assert_eq!(peek32(&mem, PT + 4) & 0x60, 0x60);
}

#[test]
fn one_gib_page_maps_in_long_mode() {
    let code = asm(64, |a| {
        a.mov(rbx, 0x4000_9000u64).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    // PDPTE 1 (linear 1–2 GiB) → physical 0 as a 1 GiB page: P | RW | PS.
    poke(&mem, PT + 0x1000 + 8, &0x83u64.to_le_bytes());
    poke(&mem, 0x9000, &PATTERN.to_le_bytes());
    // Only with CPUID.80000001H:EDX.Page1GB[26] (SDM Vol. 3A §4.5.4), which the baseline lacks.
    let profile = with(&duet_core::CpuidProfile::baseline(), 0x8000_0001, 3, 1 << 26);
    let (out, _) = run_profile(mem.clone(), &s, &profile, std::time::Duration::from_secs(5), |_| {});
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(out.state.regs.rax, u64::from(PATTERN));
    assert_eq!(peek64(&mem, PT + 0x1000 + 8) & 0x20, 0x20, "accessed bit set");
}

#[test]
fn reserved_bit_in_a_pte_faults_with_rsvd() {
    let code = asm(64, |a| {
        a.mov(rbx, 0x20_0000u64).unwrap();
        a.mov(eax, dword_ptr(rbx)).unwrap();
    });
    let mem = memory(&code);
    let s = long64(&mem);
    // Bit 51 is above MAXPHYADDR (36): reserved (SDM Vol. 3A §4.5, Table 4-20).
    let pde = peek64(&mem, PT + 0x2000 + 8) | (1 << 51);
    poke(&mem, PT + 0x2000 + 8, &pde.to_le_bytes());
    let (out, _) = run(mem.clone(), &s);
    assert_eq!(out.state.regs.rip, STUBS + 14 * 8 + 6);
    // P | RSVD for a supervisor read.
    assert_eq!(peek64(&mem, out.state.regs.rsp + 8), 0b1001);
}

#[test]
fn invlpg_drops_a_stale_translation() {
    let code = asm(32, |a| {
        a.mov(eax, dword_ptr(0x30_3000)).unwrap(); // caches 0x303000 → 0x303000
        a.mov(dword_ptr((PT + 0x1000 + 0x303 * 4) as u32), 0x9000 | 3).unwrap(); // remap to 0x9000
        a.invlpg(ptr(0x30_3000)).unwrap();
        a.mov(ecx, dword_ptr(0x30_3000)).unwrap(); // now the new page
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = paging32(&mem, protected32(&mem));
    poke(&mem, 0x30_3000, &1u32.to_le_bytes());
    poke(&mem, 0x9000, &PATTERN.to_le_bytes());
    let (out, _) = run(mem, &s);
    // Without INVLPG the old translation may still be used (SDM Vol. 3A §4.10.4.1); after it,
    // the new PTE must be.
    assert_eq!((out.state.regs.rax, out.state.regs.rcx), (1, u64::from(PATTERN)));
}
