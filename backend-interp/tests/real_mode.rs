//! Real-mode guests on the interpreter.

mod common;

use common::*;
use duet_core::StopReason;
use iced_x86::code_asm::*;

#[test]
fn real_mode_out_to_debug_console_then_hlt() {
    let code = asm(16, |a| {
        a.mov(al, b'A' as i32).unwrap();
        a.out(0xe9, al).unwrap();
        a.hlt().unwrap();
    });
    let mem = memory(&code);
    let s = real_mode(&mem);
    let (out, console) = run(mem, &s);
    assert_eq!(out.stop, StopReason::Halted);
    assert_eq!(console.text(), b"A");
    // SDM Vol. 2A HLT: the saved instruction pointer points to the instruction after HLT.
    assert_eq!(out.state.regs.rip, CODE + code.len() as u64);
    assert_eq!(out.instructions, Some(3));
}
