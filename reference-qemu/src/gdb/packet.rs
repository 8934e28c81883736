//! The gdb remote protocol's packets as bytes (framing, checksums, run-length encoding and
//! escapes) and the `g` reply of QEMU's x86-64 target: pure functions, tested without a stub.

/// Registers from the `g` packet of QEMU's x86-64 target description.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GdbRegs {
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8–R15 (gdb order).
    pub gprs: [u64; 16],
    /// RIP.
    pub rip: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR8.
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
}

pub(super) fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len() / 2).map(|i| s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

pub(super) fn le(bytes: &[u8], off: usize, len: usize) -> Option<u64> {
    let mut b = [0u8; 8];
    b[..len].copy_from_slice(bytes.get(off..off + len)?);
    Some(u64::from_le_bytes(b))
}

/// Parses the `g` reply: 16 GPRs, RIP, EFLAGS (4), six selectors (4 each), FS/GS/KERNEL_GS
/// bases, CR0, CR2, CR3, CR4, CR8, EFER (8 each), then FPU state (ignored).
pub fn parse_g(reply: &str) -> Option<GdbRegs> {
    let b = hex_bytes(reply)?;
    let mut gprs = [0u64; 16];
    for (i, g) in gprs.iter_mut().enumerate() {
        *g = le(&b, 8 * i, 8)?;
    }
    let ctl = 128 + 8 + 4 + 24 + 24;
    Some(GdbRegs {
        gprs,
        rip: le(&b, 128, 8)?,
        cr0: le(&b, ctl, 8)?,
        cr3: le(&b, ctl + 16, 8)?,
        cr8: le(&b, ctl + 32, 8)?,
        efer: le(&b, ctl + 40, 8)?,
    })
}

/// One thing received from the stub, as [`next_incoming`] splits the byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// `+`: the stub received our last packet.
    Ack,
    /// `-`: the stub asks for our last packet again.
    Nak,
    /// A packet whose checksum matches: its data as transmitted (still escaped and
    /// run-length encoded; see [`decode`]).
    Packet(Vec<u8>),
    /// A packet whose checksum does not match (`got` is `None` when not two hex digits).
    BadChecksum {
        /// The checksum sent after `#`.
        got: Option<u8>,
        /// The modulo-256 sum of the data as received.
        computed: u8,
    },
}

/// The modulo-256 sum of `data`, the packet checksum.
pub fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, &b| a.wrapping_add(b))
}

/// Takes the next acknowledgement or whole packet off the front of `buf`; `None` when `buf`
/// holds no whole one yet (what is there stays). Other bytes outside packets, and
/// notifications (`%…#xx`), are dropped.
pub fn next_incoming(buf: &mut Vec<u8>) -> Option<Incoming> {
    loop {
        let start = buf.iter().position(|&c| matches!(c, b'+' | b'-' | b'$' | b'%'));
        let Some(start) = start else {
            buf.clear();
            return None;
        };
        buf.drain(..start);
        match buf[0] {
            b'+' => {
                buf.drain(..1);
                return Some(Incoming::Ack);
            }
            b'-' => {
                buf.drain(..1);
                return Some(Incoming::Nak);
            }
            lead => {
                let hash = buf.iter().position(|&c| c == b'#')?;
                if buf.len() < hash + 3 {
                    return None;
                }
                let frame: Vec<u8> = buf.drain(..hash + 3).collect();
                if lead == b'%' {
                    continue;
                }
                let data = frame[1..hash].to_vec();
                let got =
                    std::str::from_utf8(&frame[hash + 1..]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                let computed = checksum(&data);
                return Some(if got == Some(computed) {
                    Incoming::Packet(data)
                } else {
                    Incoming::BadChecksum { got, computed }
                });
            }
        }
    }
}

/// The data of a packet as meant: run-length encoding expanded (`X*n` is X and n − 29 more
/// copies of X), then escapes undone (`}` followed by a byte stands for that byte XOR 0x20).
pub fn decode(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut expanded: Vec<u8> = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'*' {
            let (Some(&last), Some(&n)) = (expanded.last(), raw.get(i + 1)) else {
                return Err(format!(
                    "run-length marker '*' at offset {i} without a character before and a count after"
                ));
            };
            if !(b' '..=b'~').contains(&n) {
                return Err(format!(
                    "run-length count {n:#04x} at offset {} is not a printable character",
                    i + 1
                ));
            }
            expanded.extend(std::iter::repeat_n(last, usize::from(n - 29)));
            i += 2;
        } else {
            expanded.push(raw[i]);
            i += 1;
        }
    }
    let mut out = Vec::with_capacity(expanded.len());
    let mut bytes = expanded.iter();
    while let Some(&c) = bytes.next() {
        if c == b'}' {
            let &e = bytes.next().ok_or("escape character '}' at the end of the packet")?;
            out.push(e ^ 0x20);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected decodings below are worked out by hand from the GDB manual, "Remote Protocol /
    // Overview": the checksum is the modulo-256 sum of the characters between `$` and `#`;
    // `}` escapes the next byte, which is the original XOR 0x20 (0x7d is sent as 7d 5d); `*`
    // repeats the preceding character n − 29 more times, n being the next character
    // (`0* ` is "0000"; "00000000" may be sent as `0*"00`).

    fn all(mut buf: Vec<u8>) -> (Vec<Incoming>, Vec<u8>) {
        let mut v = Vec::new();
        while let Some(i) = next_incoming(&mut buf) {
            v.push(i);
        }
        (v, buf)
    }

    fn packet(raw: &[u8]) -> Vec<u8> {
        match all(raw.to_vec()).0.as_slice() {
            [Incoming::Packet(p)] => decode(p).unwrap(),
            other => panic!("{raw:?} gave {other:?}"),
        }
    }

    #[test]
    fn packet_codec_follows_the_remote_protocol() {
        // 'O' 0x4f + 'K' 0x4b = 0x9a; an acknowledgement before it.
        assert_eq!(all(b"+$OK#9a".to_vec()).0, vec![Incoming::Ack, Incoming::Packet(b"OK".to_vec())]);
        // '0' 0x30 + '*' 0x2a + ' ' 0x20 = 0x7a; ' ' is 32, so 3 more zeros.
        assert_eq!(packet(b"$0* #7a"), b"0000");
        // 3 * 0x30 + 0x2a + '"' 0x22 = 0xdc; '"' is 34, so 5 more zeros, then two.
        assert_eq!(packet(b"$0*\"00#dc"), b"00000000");
        // 'a' 0x61 + '}' 0x7d + ']' 0x5d + 'b' 0x62 + '}' 0x7d + 0x03 = 0x21d: checksum 0x1d.
        // ']' ^ 0x20 = '}', 0x03 ^ 0x20 = '#'.
        assert_eq!(packet(b"$a}]b}\x03#1d"), b"a}b#");
        // A gdbserver reply to vFile:pread as captured on the wire (checksum as sent there):
        // the file "gdbserver\0localhost:1111\0/bin/false\0", 0x24 bytes, with "1111" sent as `1* `.
        assert_eq!(
            packet(b"$F24;gdbserver\0localhost:1* \0/bin/false\0#cb"),
            b"F24;gdbserver\0localhost:1111\0/bin/false\0"
        );
        // Wrong and unreadable checksums.
        assert_eq!(
            all(b"$OK#9b".to_vec()).0,
            vec![Incoming::BadChecksum { got: Some(0x9b), computed: 0x9a }]
        );
        assert_eq!(all(b"$OK#zz".to_vec()).0, vec![Incoming::BadChecksum { got: None, computed: 0x9a }]);
        // An unfinished packet stays in the buffer until its checksum has arrived.
        let (none, rest) = all(b"-$OK#9".to_vec());
        assert_eq!((none, rest.as_slice()), (vec![Incoming::Nak], &b"$OK#9"[..]));
        // Notifications and noise are dropped.
        assert_eq!(all(b"xx%Stop:T05#00$OK#9a".to_vec()).0, vec![Incoming::Packet(b"OK".to_vec())]);
        // Malformed encodings are errors, not panics.
        assert!(decode(b"*!").is_err());
        assert!(decode(b"0*").is_err());
        assert!(decode(b"0*\x01").is_err());
        assert!(decode(b"ab}").is_err());
    }
}
