//! [`Serial`]: a 16550 UART at port 0x3F8 whose output goes to the [`Console`].

use std::convert::Infallible;

use duet_core::{BusDevice, IrqLine, WriteOutcome};
use vm_superio::serial::{Error as SuperioError, NoEvents};
use vm_superio::Trigger;

use crate::{byte_offset, Console, DeviceError};

/// Number of ports a 16550 decodes (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR).
pub const SERIAL_PORTS: u64 = 8;

/// Default interrupt vector of the UART: IRQ4 at the conventional PIC base 0x20.
pub const SERIAL_IRQ_VECTOR: u8 = 0x24;

/// vm-superio's interrupt trigger over a duet interrupt line.
#[derive(Clone, Debug)]
pub struct SerialIrq(pub IrqLine);

impl Trigger for SerialIrq {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.trigger();
        Ok(())
    }
}

/// A 16550 UART (vm-superio's model): transmitted bytes go to the console, interrupts to an [`IrqLine`].
///
/// An access wider than a byte is split into byte accesses to consecutive ports, as the ISA
/// bus does; bytes that fall past the eighth port read 0xff and are ignored on write.
#[derive(Debug)]
pub struct Serial {
    uart: vm_superio::Serial<SerialIrq, NoEvents, Console>,
}

impl Serial {
    /// A UART printing to `console` and raising `irq` when its enabled interrupts fire.
    pub fn new(console: Console, irq: IrqLine) -> Self {
        Serial { uart: vm_superio::Serial::new(SerialIrq(irq), console) }
    }

    /// The console this UART prints to.
    pub fn console(&self) -> &Console {
        self.uart.writer()
    }

    /// The vector this UART's interrupt line raises.
    pub fn vector(&self) -> u8 {
        self.uart.interrupt_evt().0.vector()
    }

    /// Queues `input` for the guest to receive; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize, DeviceError> {
        self.uart.enqueue_raw_bytes(input).map_err(|e| match e {
            SuperioError::FullFifo => DeviceError::InputFifoFull { offered: input.len() },
            SuperioError::IOError(e) => DeviceError::SerialIo(e.to_string()),
            SuperioError::Trigger(never) => match never {},
        })
    }

    /// The UART register at `offset`, when it is one of the eight.
    fn register(offset: Option<u64>) -> Option<u8> {
        offset.filter(|&o| o < SERIAL_PORTS).and_then(|o| u8::try_from(o).ok())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match Serial::register(byte_offset(offset, i)) {
                Some(reg) => self.uart.read(reg),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        for (i, &b) in data.iter().enumerate() {
            if let Some(reg) = Serial::register(byte_offset(offset, i)) {
                // The console never fails a write and the trigger is infallible, so there is
                // no error to lose here; a guest cannot observe one on real hardware either.
                let _ = self.uart.write(reg, b);
            }
        }
        WriteOutcome::Continue
    }
}

#[cfg(test)]
mod tests {
    use duet_core::InterruptLines;

    use super::*;

    // 16550 register offsets and bits (TI/National PC16550D datasheet, Table II).
    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    fn uart() -> (Serial, Console, InterruptLines) {
        let console = Console::new(false);
        let lines = InterruptLines::new();
        let serial = Serial::new(console.clone(), IrqLine::new(&lines, SERIAL_IRQ_VECTOR));
        (serial, console, lines)
    }

    fn read1(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(off, &mut b);
        b[0]
    }

    #[test]
    fn serial_thr_write_lands_in_console() {
        let (mut s, console, lines) = uart();
        for &b in b"hi\n" {
            assert_eq!(s.write(THR, &[b]), WriteOutcome::Continue);
        }
        assert_eq!(console.text(), "hi\n");
        // IER is 0 after reset: transmitting raises no interrupt.
        assert_eq!(lines.take(), None);
    }

    #[test]
    fn serial_lsr_reports_transmitter_empty() {
        let (mut s, _, _) = uart();
        // LSR bit 5 THRE and bit 6 TEMT: the virtual transmitter is always empty.
        assert_eq!(read1(&mut s, LSR), 0x60);
        let _ = s.write(THR, b"x");
        assert_eq!(read1(&mut s, LSR), 0x60);
    }

    #[test]
    fn serial_thr_empty_interrupt_raises_configured_vector() {
        let (mut s, console, lines) = uart();
        assert_eq!(s.vector(), 0x24);
        // IER bit 1 enables the THR-empty interrupt; the transmitter is already empty.
        let _ = s.write(IER, &[0x02]);
        assert_eq!(lines.take(), Some(0x24));
        // IIR reads "THR empty" (0b010) with the FIFO bits of a 16550A.
        assert_eq!(read1(&mut s, IIR), 0xc2);
        let _ = s.write(THR, b"a");
        assert_eq!(lines.take(), Some(0x24));
        assert_eq!(console.text(), "a");
    }

    #[test]
    fn serial_dlab_selects_divisor_latch_instead_of_thr() {
        let (mut s, console, _) = uart();
        let _ = s.write(LCR, &[0x80]);
        let _ = s.write(THR, &[0x01]);
        assert_eq!(read1(&mut s, THR), 0x01);
        let _ = s.write(LCR, &[0x03]);
        assert!(console.is_empty());
        let _ = s.write(SCR, &[0x5a]);
        assert_eq!(read1(&mut s, SCR), 0x5a);
    }

    #[test]
    fn serial_loopback_and_input_reach_the_receiver() {
        let (mut s, console, _) = uart();
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        // LSR bit 0: data ready.
        assert_eq!(read1(&mut s, LSR) & 1, 1);
        assert_eq!(read1(&mut s, THR), b'a');
        assert_eq!(read1(&mut s, THR), b'b');
        assert_eq!(read1(&mut s, LSR) & 1, 0);
        // MCR bit 4: loopback; THR goes to the receiver, not the console.
        let _ = s.write(MCR, &[0x10]);
        let _ = s.write(THR, b"z");
        assert_eq!(read1(&mut s, THR), b'z');
        assert!(console.is_empty());
    }

    #[test]
    fn serial_input_fifo_overflow_is_an_error() {
        let (mut s, _, _) = uart();
        assert_eq!(s.enqueue_input(&[0u8; 100]).unwrap(), 64);
        assert!(matches!(s.enqueue_input(b"x"), Err(DeviceError::InputFifoFull { offered: 1 })));
    }

    #[test]
    fn serial_wide_access_splits_into_ports_and_ignores_past_the_end() {
        let (mut s, console, _) = uart();
        // A 16-bit write at SCR-1 (MSR, read-only here) then SCR; a 4-byte one at offset 7
        // reaches only SCR.
        let _ = s.write(6, &[0x11, 0x22]);
        assert_eq!(read1(&mut s, SCR), 0x22);
        let _ = s.write(7, &[0x33, 0x44, 0x55, 0x66]);
        assert_eq!(read1(&mut s, SCR), 0x33);
        let mut b = [0u8; 4];
        s.read(7, &mut b);
        assert_eq!(b, [0x33, 0xff, 0xff, 0xff]);
        s.read(u64::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
        let _ = s.write(u64::MAX, b"abcd");
        assert!(console.is_empty());
    }
}
