//! Helpers shared by the KVM guest tests: guest builders, vCPU start-up, exit descriptions.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_core::state::Segment;
use duet_core::{Backend, CpuState, CpuidProfile, Guest, GuestMemory, Vcpu, VcpuExit};
use duet_kvm::{KvmBackend, KvmVcpu};

/// Where every test guest's code starts (CS = 0, IP = 0x7c00).
pub const ORG: u64 = 0x7c00;

/// A real-mode state at 0000:7C00 with SS:SP = 0000:7C00 (SDM Vol. 3A §21.1 real-mode addressing).
pub fn real_mode_state() -> CpuState {
    let mut s = CpuState::reset();
    s.sregs.cs = Segment::real_mode(0, true);
    s.sregs.ss = Segment::real_mode(0, false);
    s.regs.rip = ORG;
    s.regs.rsp = ORG;
    s
}

/// A 64 KiB real-mode guest with `code` at 0x7c00 and extra `(addr, bytes)` images.
pub fn guest(code: &[u8], extra: &[(u64, &[u8])]) -> Guest {
    let mut g = Guest::new("kvm-test", 0x10000);
    g.load(ORG, code.to_vec());
    for (addr, bytes) in extra {
        g.load(*addr, bytes.to_vec());
    }
    g.state = real_mode_state();
    g
}

/// Creates a KVM vCPU over `g`'s memory with the baseline CPUID profile and `g`'s start state.
pub fn start(kvm: &KvmBackend, g: &Guest) -> (Arc<GuestMemory>, KvmVcpu) {
    let memory = g.build_memory().unwrap();
    let profile = kvm.cpuid_profile(&CpuidProfile::baseline()).unwrap();
    let mut vcpu = kvm.create(memory.clone(), &profile).unwrap();
    vcpu.set_state(&g.state).unwrap();
    // Every test has a safety net: a broken backend ends in DeadlineReached, not a hang.
    vcpu.set_deadline(Some(Instant::now() + Duration::from_secs(10)));
    (memory, vcpu)
}

/// A short description of an exit, owning its data, for assertions.
pub fn describe(exit: VcpuExit<'_>) -> String {
    format!("{exit:?}")
}

/// Flat 4 GiB code (selector 8) and data (selector 0x10) descriptors: base 0, limit 0xFFFFF
/// with G = 1, D = 1; access 0x9B (code, RX, accessed) and 0x93 (data, RW, accessed)
/// (SDM Vol. 3A §3.4.5).
pub const FLAT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
pub const FLAT_DATA: u64 = 0x00cf_9300_0000_ffff;

/// A 32-bit protected-mode guest without paging: GDT at 0x500, `code` at 0x1000, ESP 0x8000.
pub fn flat32_guest(code: &[u8]) -> Guest {
    let gdt: Vec<u8> = [0u64, FLAT_CODE32, FLAT_DATA].iter().flat_map(|d| d.to_le_bytes()).collect();
    let mut g = Guest::new("pm32", 0x10000);
    g.load(0x500, gdt).load(0x1000, code.to_vec());
    let s = &mut g.state;
    s.sregs.cr0 |= duet_core::state::ctrl::CR0_PE;
    s.sregs.gdt = duet_core::DescriptorTable { base: 0x500, limit: 0x17 };
    s.sregs.cs = Segment::from_descriptor(0x8, FLAT_CODE32);
    let data = Segment::from_descriptor(0x10, FLAT_DATA);
    (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (data, data, data, data, data);
    (s.regs.rip, s.regs.rsp) = (0x1000, 0x8000);
    g
}

/// A 64-bit guest: the first 2 MiB identity-mapped, GDT at 0x500, `code` at 0x1000, RSP 0x8000.
pub fn long_mode_guest(code: &[u8]) -> Guest {
    use duet_core::state::ctrl::*;
    // PML4[0] → PDPT at 0x11000, PDPT[0] → PD at 0x12000, PD[0] = a 2 MiB page at 0
    // (P | RW | PS = 0x83) (SDM Vol. 3A §4.5, Tables 4-15/4-17/4-18).
    let mut g = Guest::new("lm64", 0x20_0000);
    g.load(0x10000, 0x11003u64.to_le_bytes().to_vec())
        .load(0x11000, 0x12003u64.to_le_bytes().to_vec())
        .load(0x12000, 0x83u64.to_le_bytes().to_vec())
        .load(0x1000, code.to_vec());
    // 64-bit code segment: L = 1, D = 0, access 0x9B (SDM Vol. 3A §5.2.1).
    let code64 = 0x00af_9b00_0000_ffffu64;
    let gdt: Vec<u8> = [0u64, code64, FLAT_DATA].iter().flat_map(|d| d.to_le_bytes()).collect();
    g.load(0x500, gdt);
    let s = &mut g.state;
    s.sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    s.sregs.cr4 = CR4_PAE;
    s.sregs.cr3 = 0x10000;
    s.sregs.efer = EFER_LME | EFER_LMA;
    s.sregs.gdt = duet_core::DescriptorTable { base: 0x500, limit: 0x17 };
    s.sregs.cs = Segment::from_descriptor(0x8, code64);
    let data = Segment::from_descriptor(0x10, FLAT_DATA);
    (s.sregs.ds, s.sregs.es, s.sregs.ss, s.sregs.fs, s.sregs.gs) = (data, data, data, data, data);
    (s.regs.rip, s.regs.rsp) = (0x1000, 0x8000);
    g
}
