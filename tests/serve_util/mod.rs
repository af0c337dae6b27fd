//! A `loip serve` child process on an ephemeral port, and a bare HTTP/1.1
//! client on `std::net` sockets: the tests need to send what a real client
//! never would (bodies over the limit, half a header, a socket that stops
//! reading), which a full client library hides.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/mod.rs"]
pub mod common;

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts `loip serve` on SmolLM2 with `args` and waits until /health
    /// answers 200.
    pub fn start(args: &[&str]) -> Server {
        Server::start_on("127.0.0.1", args)
    }

    /// As [`Server::start`], listening on `host`.
    pub fn start_on(host: &str, args: &[&str]) -> Server {
        Server::start_model(&common::smollm2(), host, args)
    }

    /// As [`Server::start_on`], serving the model at `model`.
    pub fn start_model(model: &std::path::Path, host: &str, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_loip"))
            .args(["serve", "--host", host, "--port", "0", "--threads", "2"])
            .arg("--model")
            .arg(model)
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start loip serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("loip serve ended before it listened")
                .unwrap();
            if let Some(a) = line.strip_prefix("loip: serving on http://") {
                let a: SocketAddr = a.parse().unwrap();
                // Listening on every interface: talk to it on loopback.
                break SocketAddr::new([127, 0, 0, 1].into(), a.port());
            }
        };
        // Keep draining stderr so the child never blocks on it.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        let server = Server { child, addr };
        let t0 = Instant::now();
        while server.get("/health").status != 200 {
            assert!(t0.elapsed() < Duration::from_secs(120), "never ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        request(self.addr, "POST", path, &[], body.as_bytes())
    }

    /// `loip_requests_total{outcome=...}` and the like, from /metrics.
    pub fn metric(&self, series: &str) -> f64 {
        let text = String::from_utf8(self.get("/metrics").body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
            .parse()
            .unwrap()
    }

    /// Waits up to 30 s for `series` to reach `min` (the compute thread
    /// counts a request just after sending its last event).
    pub fn wait_metric(&self, series: &str, min: f64) {
        let t0 = Instant::now();
        while self.metric(series) < min {
            assert!(t0.elapsed() < Duration::from_secs(30), "{series} < {min}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The error message of an OpenAI-shaped error body.
    pub fn error(&self) -> String {
        let j = self.json();
        let e = &j["error"];
        assert!(e["type"].is_string(), "not an error body: {j}");
        e["message"].as_str().unwrap().to_string()
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

/// Writes a request's head and body.
pub fn send(s: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) and close before the whole body is sent.
    let _ = s.write_all(body);
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    send(&mut s, method, path, headers, body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse(&raw)
}

/// Parses a whole response, decoding a chunked body.
pub fn parse(raw: &[u8]) -> Resp {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(raw)));
    let head = std::str::from_utf8(&raw[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            if size == 0 || rest.len() < nl + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 4 + size..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// A streaming request whose `data:` lines are read one at a time.
pub struct Stream {
    pub reader: BufReader<TcpStream>,
    pub status: u16,
}

impl Stream {
    pub fn open(addr: SocketAddr, path: &str, body: &str) -> Stream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        send(&mut s, "POST", path, &[], body.as_bytes());
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        Stream { reader, status }
    }

    /// The next `data:` payload; `None` at the end of the stream.
    pub fn next_data(&mut self) -> Option<String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(d) = line.trim_end().strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    /// The text of the remaining chunks, and whether `[DONE]` ended them.
    pub fn rest_text(&mut self) -> (String, bool) {
        let mut text = String::new();
        while let Some(d) = self.next_data() {
            if d == "[DONE]" {
                return (text, true);
            }
            text.push_str(&delta_text(&d));
        }
        (text, false)
    }
}

/// The text a chunk adds (chat or completions).
pub fn delta_text(data: &str) -> String {
    let j: serde_json::Value = serde_json::from_str(data).unwrap();
    let c = &j["choices"][0];
    c["delta"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or("")
        .to_string()
}

pub fn chat_body(message: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": message}],
        "temperature": 0, "max_tokens": max_tokens, "stream": stream,
    })
    .to_string()
}
