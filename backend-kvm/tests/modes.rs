//! Guests in protected and long mode on KVM, and the x87/SSE state path. Encodings are from
//! the SDM Vol. 2 opcode tables; expected values are worked out in the comments.

mod common;

use common::{describe, flat32_guest, long_mode_guest, start};
use duet_core::{Vcpu, VcpuExit};
use duet_kvm::testing::kvm_or_skip;

#[test]
fn protected_mode_flat_32_bit_guest_runs() {
    let Some(kvm) = kvm_or_skip() else { return };
    // B8 78 56 34 12 = mov eax,0x12345678 (5 bytes with a 32-bit operand); E6 E9 = out 0xE9,al;
    // F4 = hlt.
    let g = flat32_guest(&[0xb8, 0x78, 0x56, 0x34, 0x12, 0xe6, 0xe9, 0xf4]);
    let (_m, mut vcpu) = start(&kvm, &g);
    let back = vcpu.sregs().unwrap();
    assert_eq!((back.cs, back.ss), (g.state.sregs.cs, g.state.sregs.ss));
    assert_eq!(back.cs.limit, 0xffff_ffff);
    match vcpu.run().unwrap() {
        VcpuExit::IoOut { port, size, data } => assert_eq!((port, size, data), (0xe9, 1, &[0x78u8][..])),
        e => panic!("expected IoOut, got {}", describe(e)),
    }
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    let r = vcpu.regs().unwrap();
    assert_eq!((r.rax, r.rip), (0x1234_5678, 0x1008));
}

#[test]
fn long_mode_guest_with_four_level_paging_runs() {
    let Some(kvm) = kvm_or_skip() else { return };
    // 48 B8 imm64 = mov rax,0x1122334455667788 (10 bytes); E6 E9 = out 0xE9,al; F4 = hlt.
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    code.extend_from_slice(&[0xe6, 0xe9, 0xf4]);
    let (_m, mut vcpu) = start(&kvm, &long_mode_guest(&code));
    assert_eq!(vcpu.state().unwrap().mode(), duet_core::CpuMode::Long64);
    match vcpu.run().unwrap() {
        VcpuExit::IoOut { port, size, data } => assert_eq!((port, size, data), (0xe9, 1, &[0x88u8][..])),
        e => panic!("expected IoOut, got {}", describe(e)),
    }
    assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
    let r = vcpu.regs().unwrap();
    assert_eq!((r.rax, r.rip), (0x1122_3344_5566_7788, 0x100d));
}

#[test]
fn fxsave_image_matches_the_state_loaded_and_fxrstor_state_is_read_back() {
    let Some(kvm) = kvm_or_skip() else { return };
    use duet_core::vm_memory::{Bytes, GuestAddress};
    // Long mode (this host's KVM emulates real and unpaged protected mode and cannot emulate
    // SSE state instructions there). ModRM 00 reg 100 + SIB 25 + disp32 is an absolute address
    // in 64-bit mode (SDM Vol. 2A §2.2.1.6). 0F AE /0 = fxsave [0x3000];
    // 0F AE /1 = fxrstor [0x3200]; F4 = hlt.
    let code = [0x0f, 0xae, 0x04, 0x25, 0x00, 0x30, 0, 0, 0x0f, 0xae, 0x0c, 0x25, 0x00, 0x32, 0, 0, 0xf4];
    let mut g = long_mode_guest(&code);
    // FXRSTOR image: FCW 0x0E7F at byte 0, MXCSR 0x3F80 at byte 24, XMM3 at byte 160 + 3 × 16
    // (SDM Vol. 1 §10.5.1 Table 10-2).
    let mut image = [0u8; 512];
    image[0..2].copy_from_slice(&0x0e7fu16.to_le_bytes());
    image[24..28].copy_from_slice(&0x3f80u32.to_le_bytes());
    image[208..224].copy_from_slice(&[0x3c; 16]);
    g.load(0x3200, image.to_vec());
    // FXSAVE/FXRSTOR of the SSE part need CR4.OSFXSR (SDM Vol. 2A FXSAVE).
    g.state.sregs.cr4 |= duet_core::state::ctrl::CR4_OSFXSR;
    g.state.fpu.0[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
    g.state.fpu.0[24..28].copy_from_slice(&0x1f00u32.to_le_bytes());
    g.state.fpu.0[160..176].copy_from_slice(&[0xa5; 16]);
    let (mem, mut vcpu) = start(&kvm, &g);
    let exit = describe(vcpu.run().unwrap());
    assert_eq!(exit, "Hlt", "rip {:#x}", vcpu.regs().unwrap().rip);
    // What set_state loaded is what the guest's FXSAVE stored…
    let mut saved = [0u8; 512];
    mem.read_slice(&mut saved, GuestAddress(0x3000)).unwrap();
    assert_eq!(u16::from_le_bytes([saved[0], saved[1]]), 0x027f);
    assert_eq!(u32::from_le_bytes([saved[24], saved[25], saved[26], saved[27]]), 0x1f00);
    assert_eq!(saved[160..176], [0xa5; 16]);
    // …and what the guest's FXRSTOR loaded is what state() reads.
    let fpu = vcpu.state().unwrap().fpu;
    assert_eq!((fpu.fcw(), fpu.mxcsr()), (0x0e7f, 0x3f80));
    assert_eq!(fpu.xmm(3), u128::from_le_bytes([0x3c; 16]));
}
