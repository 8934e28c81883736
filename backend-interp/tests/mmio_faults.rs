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
    // enter 0, 2 (C8 00 00 02) in 64-bit mode: pushes RBP onto the stack, which is MMIO here,
    // then reads the caller's frame pointer at RBP − 8, which is not canonical: #SS(0)
    // (SDM Vol. 2A ENTER) before ENTER completes.
    let mem = memory(&[0xc8, 0x00, 0x00, 0x02, 0xf4]);
    let mut s = long64(&mem);
    // 8 MiB: identity-mapped by the fixture's page tables, past its 4 MiB of RAM.
    const MMIO_STACK: u64 = 0x80_0000;
    const FRAME: u64 = 0x8000_0000_0000_1008;
    s.regs.rsp = MMIO_STACK;
    s.regs.rbp = FRAME;
    let writes: Writes = Arc::default();
    let recorder = Arc::new(Mutex::new(Recorder(writes.clone())));
    let (out, _) = run_with(mem, &s, Duration::from_secs(5), |m| {
        m.mmio.insert(MMIO_STACK - 0x1000, 0x1000, recorder).unwrap();
    });
    // #SS(0) was delivered: its stub ran and halted, with the exception frame on the MMIO stack.
    assert_eq!(stub_vector(&out.state), Some(12), "{:?}", out.stop);
    let w = writes.lock().unwrap();
    assert!(!w.is_empty(), "the exception frame goes to the MMIO stack");
    // ENTER's push of RBP never reached the bus.
    let pushed_rbp = FRAME.to_le_bytes();
    assert!(w.iter().all(|(_, d)| d.as_slice() != pushed_rbp), "writes: {w:x?}");
}
