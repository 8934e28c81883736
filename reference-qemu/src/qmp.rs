//! A minimal QMP client (QEMU Machine Protocol: one JSON object per line over a Unix socket)
//! with just enough JSON to read QEMU's answers.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::QemuError;

/// A JSON value, as much of JSON as QMP answers use.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number, kept as its text.
    Num(String),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, keys in order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string value, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Parses one JSON text; `None` when it is not valid JSON.
    pub fn parse(text: &str) -> Option<Json> {
        let b = text.as_bytes();
        let mut i = 0;
        let v = value(b, &mut i, 0)?;
        skip_ws(b, &mut i);
        (i == b.len()).then_some(v)
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while b.get(*i).is_some_and(|c| c.is_ascii_whitespace()) {
        *i += 1;
    }
}

/// Deepest nesting of arrays and objects accepted (QMP answers nest a few levels).
const MAX_DEPTH: u32 = 64;

fn value(b: &[u8], i: &mut usize, depth: u32) -> Option<Json> {
    if depth > MAX_DEPTH {
        return None;
    }
    skip_ws(b, i);
    match *b.get(*i)? {
        b'{' => {
            *i += 1;
            let mut m = Vec::new();
            loop {
                skip_ws(b, i);
                if b.get(*i) == Some(&b'}') {
                    *i += 1;
                    return Some(Json::Obj(m));
                }
                let Json::Str(k) = value(b, i, depth + 1)? else { return None };
                skip_ws(b, i);
                (b.get(*i) == Some(&b':')).then_some(())?;
                *i += 1;
                m.push((k, value(b, i, depth + 1)?));
                skip_ws(b, i);
                match b.get(*i)? {
                    b',' => *i += 1,
                    b'}' => {}
                    _ => return None,
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut v = Vec::new();
            loop {
                skip_ws(b, i);
                if b.get(*i) == Some(&b']') {
                    *i += 1;
                    return Some(Json::Arr(v));
                }
                v.push(value(b, i, depth + 1)?);
                skip_ws(b, i);
                match b.get(*i)? {
                    b',' => *i += 1,
                    b']' => {}
                    _ => return None,
                }
            }
        }
        b'"' => string(b, i).map(Json::Str),
        b't' if b[*i..].starts_with(b"true") => {
            *i += 4;
            Some(Json::Bool(true))
        }
        b'f' if b[*i..].starts_with(b"false") => {
            *i += 5;
            Some(Json::Bool(false))
        }
        b'n' if b[*i..].starts_with(b"null") => {
            *i += 4;
            Some(Json::Null)
        }
        _ => {
            let start = *i;
            while b.get(*i).is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c)) {
                *i += 1;
            }
            (*i > start).then(|| Json::Num(String::from_utf8_lossy(&b[start..*i]).into_owned()))
        }
    }
}

fn string(b: &[u8], i: &mut usize) -> Option<String> {
    *i += 1;
    let mut out: Vec<u8> = Vec::new();
    loop {
        let c = *b.get(*i)?;
        *i += 1;
        match c {
            b'"' => return String::from_utf8(out).ok(),
            b'\\' => {
                let e = *b.get(*i)?;
                *i += 1;
                let ch = match e {
                    b'n' => '\n',
                    b't' => '\t',
                    b'r' => '\r',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'u' => {
                        let hex = std::str::from_utf8(b.get(*i..*i + 4)?).ok()?;
                        *i += 4;
                        char::from_u32(u32::from_str_radix(hex, 16).ok()?).unwrap_or('\u{fffd}')
                    }
                    other => char::from(other),
                };
                let mut buf = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            }
            _ => out.push(c),
        }
    }
}

/// Escapes `s` as a JSON string literal.
pub fn quote(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// How long one read of the socket waits before the deadline is checked again.
const POLL: Duration = Duration::from_millis(50);
/// The longest line QEMU may send (an `info registers` answer is a few KiB).
const MAX_LINE: usize = 1 << 20;
/// How many events [`Qmp::events`] keeps (the most recent).
pub const MAX_EVENTS: usize = 1024;

/// A QMP connection in command mode.
pub struct Qmp {
    stream: UnixStream,
    /// Bytes received but not yet part of a whole line (kept across read timeouts).
    pending: Vec<u8>,
    /// How many leading bytes of `pending` are known to hold no newline.
    scanned: usize,
    /// How long one command may take, events included.
    timeout: Duration,
    /// The `id` of the next command (QEMU echoes it in the answer).
    next_id: u64,
    /// Events seen while waiting for answers (`SHUTDOWN`, `STOP`, …), oldest first; at most
    /// the last [`MAX_EVENTS`].
    pub events: Vec<Json>,
}

impl Qmp {
    /// Takes over a connected socket: reads the greeting and enters command mode. Every
    /// command (the greeting included) must be answered within `timeout`.
    pub fn new(stream: UnixStream, timeout: Duration) -> Result<Self, QemuError> {
        let mut q = Qmp { stream, pending: Vec::new(), scanned: 0, timeout, next_id: 1, events: Vec::new() };
        let greeting = q.line("greeting", Instant::now() + timeout)?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Qmp { command: "greeting".into(), message: format!("{greeting:?}") });
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The next whole line as JSON, read before `deadline`. A read that times out keeps what
    /// it got: the line continues with the next read.
    fn line(&mut self, command: &str, deadline: Instant) -> Result<Json, QemuError> {
        let fail = |message: String| QemuError::Qmp { command: command.into(), message };
        loop {
            let from = self.scanned;
            let newline = self.pending[from..].iter().position(|&c| c == b'\n').map(|n| from + n);
            self.scanned = self.pending.len();
            if let Some(nl) = newline {
                let raw: Vec<u8> = self.pending.drain(..=nl).collect();
                self.scanned = 0;
                let text = String::from_utf8_lossy(&raw);
                if text.trim().is_empty() {
                    continue;
                }
                return Json::parse(text.trim()).ok_or_else(|| fail(format!("not JSON: {text:?}")));
            }
            if self.pending.len() > MAX_LINE {
                return Err(fail(format!("QEMU sent a line longer than {MAX_LINE} bytes")));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(fail(format!(
                    "no answer within {} ms ({} bytes of an unfinished line received)",
                    self.timeout.as_millis(),
                    self.pending.len()
                )));
            }
            let wait = (deadline - now).clamp(Duration::from_millis(1), POLL);
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|e| fail(format!("setting the read timeout: {e}")))?;
            let mut buf = [0u8; 8192];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(fail("QEMU closed the socket".into())),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(fail(format!("reading the answer: {e}"))),
            }
        }
    }

    /// Runs `command` with `arguments` (a JSON object text) and returns its `return` value;
    /// fails when the answer has not come within the connection's timeout, however many
    /// events arrive meanwhile. A late answer to an earlier command (told apart by its `id`)
    /// is skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<&str>) -> Result<Json, QemuError> {
        let deadline = Instant::now() + self.timeout;
        let id = self.next_id;
        self.next_id += 1;
        let msg = match arguments {
            Some(a) => format!("{{\"execute\": {}, \"arguments\": {a}, \"id\": {id}}}\n", quote(command)),
            None => format!("{{\"execute\": {}, \"id\": {id}}}\n", quote(command)),
        };
        self.stream
            .write_all(msg.as_bytes())
            .map_err(|e| QemuError::Qmp { command: command.into(), message: format!("sending: {e}") })?;
        let mut events = 0usize;
        loop {
            let v = self.line(command, deadline)?;
            // QEMU echoes the id; only an answer to a request it could not parse has none.
            let ours = v.get("id").is_none_or(|i| *i == Json::Num(id.to_string()));
            if let (true, Some(r)) = (ours, v.get("return")) {
                return Ok(r.clone());
            }
            if let (true, Some(e)) = (ours, v.get("error")) {
                let desc = e.get("desc").and_then(Json::as_str).unwrap_or("(no description)");
                return Err(QemuError::Qmp { command: command.into(), message: desc.into() });
            }
            if v.get("event").is_some() {
                events += 1;
                if self.events.len() >= MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(v);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Qmp {
                    command: command.into(),
                    message: format!(
                        "no answer within {} ms ({events} events arrived meanwhile)",
                        self.timeout.as_millis()
                    ),
                });
            }
        }
    }

    /// Runs a human-monitor command (e.g. `info registers`) and returns its text.
    pub fn hmp(&mut self, line: &str) -> Result<String, QemuError> {
        let args = format!("{{\"command-line\": {}}}", quote(line));
        let r = self.execute("human-monitor-command", Some(&args))?;
        r.as_str().map(str::to_string).ok_or_else(|| QemuError::Qmp {
            command: line.into(),
            message: format!("expected text, got {r:?}"),
        })
    }

    /// The run state (`running`, `paused`, `shutdown`, …).
    pub fn status(&mut self) -> Result<String, QemuError> {
        let r = self.execute("query-status", None)?;
        r.get("status").and_then(Json::as_str).map(str::to_string).ok_or_else(|| QemuError::Qmp {
            command: "query-status".into(),
            message: format!("no status in {r:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::thread::JoinHandle;

    use super::*;

    const GREETING: &[u8] = b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n";
    const EVENT: &[u8] = b"{\"event\": \"RTC_CHANGE\", \"data\": {\"offset\": 0}}\r\n";

    /// A fake QEMU on the other end of a socket pair: greets, answers `qmp_capabilities`,
    /// then hands the connection to `then` (which sees each later command line).
    fn fake_qemu(
        then: impl FnOnce(&mut UnixStream, &mut dyn FnMut() -> String) + Send + 'static,
    ) -> (UnixStream, JoinHandle<()>) {
        let (client, mut server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(server.try_clone().unwrap());
            let mut next = move || {
                let mut l = String::new();
                reader.read_line(&mut l).unwrap_or(0);
                l
            };
            server.write_all(GREETING).unwrap();
            assert!(next().contains("qmp_capabilities"));
            server.write_all(b"{\"return\": {}}\r\n").unwrap();
            then(&mut server, &mut next);
        });
        (client, handle)
    }

    #[test]
    fn qmp_line_split_across_a_read_timeout_is_kept() {
        // The answer arrives in two parts with a pause of several read timeouts between them.
        let (sock, qemu) = fake_qemu(|s, next| {
            assert!(next().contains("query-status"));
            s.write_all(b"{\"return\": {\"status\": \"pau").unwrap();
            std::thread::sleep(POLL * 6);
            s.write_all(b"sed\", \"running\": false}}\r\n").unwrap();
        });
        let mut q = Qmp::new(sock, Duration::from_secs(5)).unwrap();
        assert_eq!(q.status().unwrap(), "paused");
        qemu.join().unwrap();
    }

    #[test]
    fn qmp_command_has_a_deadline_even_while_events_keep_arriving() {
        let (sock, qemu) = fake_qemu(|s, next| {
            assert!(next().contains("query-status"));
            // A chatty QEMU: an event every 5 ms and never an answer, until the client goes away.
            while s.write_all(EVENT).is_ok() {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let limit = Duration::from_millis(400);
        let mut q = Qmp::new(sock, limit).unwrap();
        let start = Instant::now();
        let err = q.status().unwrap_err();
        let took = start.elapsed();
        assert!(took >= limit && took < limit * 5, "gave up after {took:?}");
        let text = err.to_string();
        assert!(text.contains("query-status") && text.contains("no answer within 400 ms"), "{text}");
        assert!(!q.events.is_empty() && q.events.len() <= MAX_EVENTS);
        drop(q);
        qemu.join().unwrap();
    }

    #[test]
    fn qmp_endless_line_is_refused() {
        let (sock, qemu) = fake_qemu(|s, next| {
            assert!(next().contains("query-status"));
            let chunk = [b' '; 4096];
            // Until the client gives up and closes its end.
            while s.write_all(&chunk).is_ok() {}
        });
        let mut q = Qmp::new(sock, Duration::from_secs(20)).unwrap();
        let err = q.status().unwrap_err().to_string();
        assert!(err.contains("QMP query-status: QEMU sent a line longer than 1048576 bytes"), "{err}");
        drop(q);
        qemu.join().unwrap();
    }

    #[test]
    fn qmp_late_answer_is_skipped_and_garbage_is_a_clear_error() {
        let (sock, qemu) = fake_qemu(|s, next| {
            // Commands carry ids 1, 2, … (qmp_capabilities was 1).
            assert!(next().contains(r#""execute": "stop", "id": 2"#));
            // Half a line, then nothing: the deadline names the command and the partial line.
            s.write_all(br#"{"retu"#).unwrap();
            assert!(next().contains(r#""execute": "cont", "id": 3"#));
            // The rest of stop's answer, late, then cont's own answer.
            s.write_all(b"rn\": {}, \"id\": 2}\r\n").unwrap();
            s.write_all(b"{\"return\": {\"mine\": true}, \"id\": 3}\r\n").unwrap();
            assert!(next().contains("quit"));
            s.write_all(b"not json\r\n").unwrap();
        });
        let mut q = Qmp::new(sock, Duration::from_millis(300)).unwrap();
        let err = q.execute("stop", None).unwrap_err().to_string();
        assert!(err.contains("QMP stop: no answer within 300 ms (6 bytes of an unfinished line"), "{err}");
        let mine = q.execute("cont", None).unwrap();
        assert_eq!(mine.get("mine"), Some(&Json::Bool(true)));
        let err = q.execute("quit", None).unwrap_err().to_string();
        assert!(err.contains("QMP quit: not JSON"), "{err}");
        qemu.join().unwrap();
    }

    #[test]
    fn json_parses_qmp_answers_and_escapes() {
        let v = Json::parse(r#"{"return": {"status": "paused", "running": false, "n": -1.5e3}}"#).unwrap();
        let r = v.get("return").unwrap();
        assert_eq!(r.get("status").and_then(Json::as_str), Some("paused"));
        assert_eq!(r.get("running"), Some(&Json::Bool(false)));
        assert_eq!(r.get("n"), Some(&Json::Num("-1.5e3".into())));
        let s = Json::parse(r#"{"return": "CPU#0\r\nEAX=0 \"q\" \u0041"}"#).unwrap();
        assert_eq!(s.get("return").and_then(Json::as_str), Some("CPU#0\r\nEAX=0 \"q\" A"));
        assert_eq!(
            Json::parse("[1, null, true]"),
            Some(Json::Arr(vec![Json::Num("1".into()), Json::Null, Json::Bool(true)]))
        );
        assert_eq!(Json::parse("{\"a\": }"), None);
        assert_eq!(Json::parse("\"unterminated"), None);
        // Nesting is bounded (a hostile line cannot exhaust the stack); QMP's few levels pass.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(Json::parse(&deep), None);
        let ok = format!("{}{}", "[".repeat(10), "]".repeat(10));
        assert!(Json::parse(&ok).is_some());
        assert_eq!(quote("a\"b\\\n"), r#""a\"b\\\n""#);
    }
}
