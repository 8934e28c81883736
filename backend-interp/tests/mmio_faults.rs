//! A faulting instruction writes nothing: the MMIO writes it queued before the fault are
//! dropped, never handed to the run loop. SDM Vol. 3A §6.5: a fault is reported with the
//! machine state as it was before the faulting instruction began, so hardware (KVM) never
//! performs its stores.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use duet_core::{BusDevice, WriteOutcome};

/// MMIO writes as (offset, data), in order.
type Writes = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Records every MMIO write it receives.
struct Recorder(Writes);

impl BusDevice for Recorder {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        self.0.lock().unwrap().push((offset, data.to_vec()));
        WriteOutcome::Continue
    }
}

#[test]
fn mmio_faulting_instruction_leaves_no_write_exit() {
    // Real mode, the stack in MMIO (SS base past RAM), SP = 6. CALL FAR with a 32-bit operand
    // (66 9A) pushes CS as 4 bytes at SS:2, then EIP at SS:0xFFFE, whose last byte lies past
    // the 64 KiB limit: #SS(0) (SDM Vol. 2A CALL, real-address mode) after the first push.
    let mem = memory(&[0x66, 0x9a, 0x10, 0x00, 0x00, 0x00, 0x34, 0x12]);
    let mut s = real_mode(&mem);
    const MMIO_STACK: u64 = 0x80_0000;
    s.sregs.ss.base = MMIO_STACK;
    s.regs.rsp = 6;
    let writes: Writes = Arc::default();
    let recorder = Arc::new(Mutex::new(Recorder(writes.clone())));
    let (out, _) = run_with(mem, &s, Duration::from_secs(5), |m| {
        m.mmio.insert(MMIO_STACK, 0x1_0000, recorder).unwrap();
    });
    // #SS was delivered through the IVT (FLAGS, CS, IP pushed at SS:4, 2, 0) to its stub,
    // `push 12; hlt`, which halted.
    assert_eq!(out.state.regs.rip, STUBS + 12 * 8 + 4, "{:?}", out.stop);
    let w = writes.lock().unwrap();
    assert_eq!(
        w.iter().map(|(off, d)| (*off, d.len())).collect::<Vec<_>>(),
        [(4, 2), (2, 2), (0, 2), (0xfffe, 2)],
        "the exception frame and the stub's push, nothing else: {w:x?}"
    );
}
