//! A minimal QMP client (QEMU Machine Protocol: one JSON object per line over a Unix socket)
//! with just enough JSON to read QEMU's answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
        let v = value(b, &mut i)?;
        skip_ws(b, &mut i);
        (i == b.len()).then_some(v)
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while b.get(*i).is_some_and(|c| c.is_ascii_whitespace()) {
        *i += 1;
    }
}

fn value(b: &[u8], i: &mut usize) -> Option<Json> {
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
                let Json::Str(k) = value(b, i)? else { return None };
                skip_ws(b, i);
                (b.get(*i) == Some(&b':')).then_some(())?;
                *i += 1;
                m.push((k, value(b, i)?));
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
                v.push(value(b, i)?);
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

/// A QMP connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen while waiting for answers (`SHUTDOWN`, `STOP`, …), oldest first.
    pub events: Vec<Json>,
}

impl Qmp {
    /// Takes over a connected socket: reads the greeting and enters command mode.
    pub fn new(stream: UnixStream, timeout: Duration) -> Result<Self, QemuError> {
        let io = |source| QemuError::Io { what: "QMP socket", path: "qmp".into(), source };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp { reader: BufReader::new(stream), writer, events: Vec::new() };
        let greeting = q.line("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Qmp { command: "greeting".into(), message: format!("{greeting:?}") });
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn line(&mut self, command: &str) -> Result<Json, QemuError> {
        let mut text = String::new();
        let n = self.reader.read_line(&mut text).map_err(|e| QemuError::Qmp {
            command: command.into(),
            message: format!("reading the answer: {e}"),
        })?;
        if n == 0 {
            return Err(QemuError::Qmp { command: command.into(), message: "QEMU closed the socket".into() });
        }
        Json::parse(text.trim())
            .ok_or_else(|| QemuError::Qmp { command: command.into(), message: format!("not JSON: {text:?}") })
    }

    /// Runs `command` with `arguments` (a JSON object text) and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<&str>) -> Result<Json, QemuError> {
        let msg = match arguments {
            Some(a) => format!("{{\"execute\": {}, \"arguments\": {a}}}\n", quote(command)),
            None => format!("{{\"execute\": {}}}\n", quote(command)),
        };
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| QemuError::Qmp { command: command.into(), message: format!("sending: {e}") })?;
        loop {
            let v = self.line(command)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e.get("desc").and_then(Json::as_str).unwrap_or("(no description)");
                return Err(QemuError::Qmp { command: command.into(), message: desc.into() });
            }
            if v.get("event").is_some() {
                self.events.push(v);
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
    use super::*;

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
        assert_eq!(quote("a\"b\\\n"), r#""a\"b\\\n""#);
    }
}
