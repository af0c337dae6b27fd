//! `loip serve` end to end over real sockets: the OpenAI API whole and
//! streamed, every bad input of RELIABILITY.md's HTTP table, the API key,
//! a full queue, client disconnects, slowloris, and batching that never
//! changes an answer.

mod serve_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;
use serve_util::{chat_body, delta_text, request, Server, Stream};

#[test]
fn chat_and_completions_whole_and_streamed() {
    let server = Server::start(&[]);
    let health = server.get("/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let r = server.post(
        "/v1/chat/completions",
        &chat_body("What is the capital of France?", 30, false),
    );
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    let text = j["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    let usage = &j["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streamed, the same text; a finish chunk, then usage, then [DONE].
    let body = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
                      "temperature": 0, "max_tokens": 30, "stream": true,
                      "stream_options": {"include_usage": true}})
    .to_string();
    let r = server.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let data = r.sse();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| delta_text(d))
        .collect();
    assert_eq!(streamed, text);
    let first: serde_json::Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"], *usage);
    let finish: serde_json::Value = serde_json::from_str(&data[data.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");

    // Completions, cut by max_tokens: finish_reason "length".
    let r = server.post(
        "/v1/completions",
        r#"{"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}"#,
    );
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["object"], "text_completion");
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 5);
    let whole = j["choices"][0]["text"].as_str().unwrap().to_string();
    let r = server.post(
        "/v1/completions",
        r#"{"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": true}"#,
    );
    let data = r.sse();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| delta_text(d))
        .collect();
    assert_eq!(streamed, whole);

    // A stop string ends the answer before it; seeds reproduce samples.
    let r = server.post(
        "/v1/completions",
        r#"{"prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7"]}"#,
    );
    let j = r.json();
    assert_eq!(j["choices"][0]["finish_reason"], "stop");
    assert!(!j["choices"][0]["text"].as_str().unwrap().contains(" 7"));
    let seeded = r#"{"prompt": "The weather", "max_tokens": 12, "temperature": 1, "seed": 42}"#;
    assert_eq!(
        server.post("/v1/completions", seeded).json()["choices"],
        server.post("/v1/completions", seeded).json()["choices"]
    );

    let models = server.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1");

    let metrics = String::from_utf8(server.get("/metrics").body).unwrap();
    for name in [
        "loip_requests_total{outcome=\"ok\"}",
        "loip_prompt_tokens_total",
        "loip_generated_tokens_total",
        "loip_ttft_seconds_bucket",
        "loip_inter_token_seconds_bucket",
        "loip_queue_depth",
        "loip_kv_bytes{node=",
        "loip_loading_bubbles_total{node=",
        "# TYPE loip_link_bytes_total counter",
        "loip_plan_epoch 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    server.wait_metric("loip_requests_total{outcome=\"ok\"}", 7.0);

    let cluster = server.get("/v1/cluster").json();
    assert_eq!(cluster["leader"], cluster["nodes"][0]["id"]);
    assert_eq!(cluster["nodes"][0]["windows"][0]["last_layer"], 29);
    assert_eq!(
        cluster["nodes"][0]["windows"][0]["resident"]
            .as_array()
            .unwrap()
            .len(),
        61
    );

    // The page, with nothing loaded from elsewhere.
    let page = server.get("/");
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("/v1/chat/completions"));
    for external in [
        "src=\"http",
        "href=\"http",
        "url(http",
        "@import",
        "src=\"//",
    ] {
        assert!(!html.contains(external), "the page loads {external}");
    }
}

/// Every bad request is a 4xx with OpenAI's error shape and a message
/// that says what is wrong; the server keeps serving.
#[test]
fn bad_input_gets_a_clear_4xx() {
    let mut server = Server::start(&[]);
    let chat = "/v1/chat/completions";
    let user = r#"[{"role": "user", "content": "hi"}]"#;
    let cases: Vec<(String, u16, &str)> = vec![
        ("{".into(), 400, "invalid JSON"),
        ("not json".into(), 400, "invalid JSON"),
        (r#"{"messages": "hi"}"#.into(), 400, "invalid JSON"),
        (
            format!(r#"{{"messages": {user}, "max_tokens": "ten"}}"#),
            400,
            "invalid JSON",
        ),
        (
            format!(r#"{{"messages": {user}, "temperature": NaN}}"#),
            400,
            "invalid JSON",
        ),
        (
            format!(
                r#"{{"x": {}{}, "messages": {user}}}"#,
                "[".repeat(50_000),
                "]".repeat(50_000)
            ),
            400,
            "recursion limit",
        ),
        (
            format!(r#"{{"messages": {user}, "max_tokens": -1}}"#),
            400,
            "max_tokens = -1",
        ),
        (
            format!(r#"{{"messages": {user}, "max_tokens": 0}}"#),
            400,
            "max_tokens = 0",
        ),
        (
            format!(r#"{{"messages": {user}, "max_completion_tokens": 0}}"#),
            400,
            "max_completion_tokens",
        ),
        (
            format!(r#"{{"messages": {user}, "max_tokens": 1e9}}"#),
            400,
            "invalid JSON",
        ),
        (
            format!(r#"{{"messages": {user}, "max_tokens": 1000000000}}"#),
            400,
            "maximum context length is 8192",
        ),
        (
            format!(r#"{{"messages": {user}, "n": 2}}"#),
            400,
            "only n = 1",
        ),
        (
            format!(r#"{{"messages": {user}, "n": -5}}"#),
            400,
            "only n = 1",
        ),
        (
            format!(r#"{{"messages": {user}, "stop": ["a", "b", "c", "d", "e"]}}"#),
            400,
            "at most 4",
        ),
        (
            format!(r#"{{"messages": {user}, "temperature": -1}}"#),
            400,
            "temperature",
        ),
        (
            format!(r#"{{"messages": {user}, "temperature": 1e300}}"#),
            400,
            "temperature",
        ),
        (
            format!(r#"{{"messages": {user}, "top_p": 1.5}}"#),
            400,
            "top_p",
        ),
        (
            r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.into(),
            400,
            "unknown role",
        ),
        (r#"{"messages": []}"#.into(), 400, "empty"),
        (r#"{}"#.into(), 400, "missing field `messages`"),
    ];
    for (body, status, needle) in &cases {
        let r = server.post(chat, body);
        assert_eq!(
            r.status,
            *status,
            "{body:.80}: {:?}",
            String::from_utf8_lossy(&r.body)
        );
        let message = r.error();
        assert!(message.contains(needle), "{body:.80}: {message}");
    }

    // A prompt past the context: 400 naming the limit.
    let long = "hello ".repeat(9000);
    let r = server.post(chat, &chat_body(&long, 16, false));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("8192"), "{}", r.error());
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // max_tokens counts too: a prompt that fits alone but not with 256 more.
    let near = "hello ".repeat(8000);
    let r = server.post("/v1/completions", &json!({"prompt": near}).to_string());
    assert_eq!(r.status, 400, "{}", r.error());
    assert!(r.error().contains("max_tokens is 256"), "{}", r.error());

    // Invalid UTF-8 in the body.
    let r = request(
        server.addr,
        "POST",
        chat,
        &[],
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}",
    );
    assert_eq!(r.status, 400);
    assert!(r.error().contains("UTF-8"), "{}", r.error());

    // A body over 2 MiB: 413 on every route, whatever the method.
    let big = vec![b'x'; (2 << 20) + 1];
    for (method, path) in [
        ("POST", chat),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/cluster"),
        ("GET", "/metrics"),
        ("GET", "/health"),
        ("GET", "/"),
        ("POST", "/nowhere"),
    ] {
        let r = request(server.addr, method, path, &[], &big);
        assert_eq!(r.status, 413, "{method} {path}");
        assert!(r.error().contains("2097152"), "{}", r.error());
    }
    // A 1.9 MiB string inside valid JSON is read, parsed and refused for
    // the context, not for its size.
    let r = server.post(chat, &chat_body(&"a".repeat(1900 << 10), 8, false));
    assert_eq!(r.status, 400);
    // A chunked body without a length, over the limit: 413 while reading.
    let mut s = TcpStream::connect(server.addr).unwrap();
    write!(s, "POST {chat} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..3 {
        let _ = write!(s, "{:x}\r\n", chunk.len());
        let _ = s.write_all(&chunk);
        let _ = s.write_all(b"\r\n");
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert_eq!(serve_util::parse(&raw).status, 413);

    // 10k headers: refused (431), not held.
    let headers: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("x-h{i}"), "v".to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut s = TcpStream::connect(server.addr).unwrap();
    serve_util::send(&mut s, "GET", "/health", &refs, b"");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if !raw.is_empty() {
        assert_eq!(serve_util::parse(&raw).status, 431);
    }

    let r = server.get("/v1/nothing");
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/v1/nothing"));

    // Still serving.
    assert!(server.is_running());
    let r = server.post(chat, &chat_body("Say hi", 4, false));
    assert_eq!(r.status, 200);
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn api_key_guards_everything_but_health_and_the_page() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let body = chat_body("hi", 2, false);
    for (method, path) in [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/cluster"),
        ("GET", "/metrics"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let b = if method == "POST" {
                body.as_bytes()
            } else {
                b""
            };
            let r = request(server.addr, method, path, &headers, b);
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}");
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        }
    }
    let ok = [("Authorization", "Bearer s3cret")];
    let r = request(
        server.addr,
        "POST",
        "/v1/chat/completions",
        &ok,
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        request(server.addr, "GET", "/metrics", &ok, b"").status,
        200
    );
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/").status, 200);
}

/// One place in the batch, one in the queue: the third request is refused
/// at once with Retry-After, and /health still answers.
#[test]
fn full_queue_is_a_fast_429() {
    let server = Server::start(&["--max-batch", "1", "--queue", "1"]);
    let long = json!({"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0.8,
                      "seed": 1, "stream": true})
    .to_string();
    let mut first = Stream::open(server.addr, "/v1/completions", &long);
    assert_eq!(first.status, 200);
    first.next_data().unwrap(); // generating: it holds the only place
    let addr = server.addr;
    let body = long.clone();
    let queued = std::thread::spawn(move || Stream::open(addr, "/v1/completions", &body));
    let t0 = Instant::now();
    while server.metric("loip_queue_depth") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = Instant::now();
    let r = server.post("/v1/completions", &long);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "429 took {:?}",
        t.elapsed()
    );
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.error().contains("queue is full"));
    assert_eq!(server.get("/health").status, 200);
    assert!(server.metric("loip_requests_total{outcome=\"queue_full\"}") >= 1.0);
    drop(first);
    drop(queued.join().unwrap());
}

/// 32 requests at once, each answered exactly as when it runs alone.
#[test]
fn concurrent_requests_match_requests_alone() {
    let server = Server::start(&["--max-batch", "16", "--queue", "32"]);
    let topics = [
        "the sea",
        "a cat",
        "mountains",
        "rain",
        "coffee",
        "the moon",
        "trains",
        "bread",
    ];
    let bodies: Vec<String> = (0..32)
        .map(|i| {
            let prompt = format!("Write one sentence about {}.", topics[i % topics.len()]);
            json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                   "max_tokens": 12 + (i % 16) % 5, "stream": i % 2 == 0})
            .to_string()
        })
        .collect();
    let text_of = |r: serve_util::Resp, stream: bool| -> String {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if stream {
            let d = r.sse();
            assert_eq!(d.last().unwrap(), "[DONE]");
            d[..d.len() - 1].iter().map(|x| delta_text(x)).collect()
        } else {
            r.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    // Alone: one at a time (distinct bodies only).
    let alone: Vec<String> = bodies
        .iter()
        .enumerate()
        .take(16)
        .map(|(i, b)| text_of(server.post("/v1/chat/completions", b), i % 2 == 0))
        .collect();
    let addr = server.addr;
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, b)| {
            std::thread::spawn(move || {
                (
                    i,
                    request(addr, "POST", "/v1/chat/completions", &[], b.as_bytes()),
                )
            })
        })
        .collect();
    for h in handles {
        let (i, r) = h.join().unwrap();
        // Bodies i and i + 16 are the same request.
        let same = i % 16;
        assert_eq!(text_of(r, i % 2 == 0), alone[same], "request {i}");
    }
    server.wait_metric("loip_requests_total{outcome=\"ok\"}", 48.0);
}

/// A client that leaves mid-stream: its sequence leaves the batch, the
/// other stream runs to the end.
#[test]
fn disconnect_mid_stream_leaves_others_going() {
    let server = Server::start(&[]);
    let body = |seed: u64| {
        json!({"prompt": "Once upon a time", "max_tokens": 300, "temperature": 1.0,
               "seed": seed, "stream": true})
        .to_string()
    };
    let mut stays = Stream::open(server.addr, "/v1/completions", &body(1));
    let mut leaves = Stream::open(server.addr, "/v1/completions", &body(2));
    for _ in 0..3 {
        stays.next_data().unwrap();
        leaves.next_data().unwrap();
    }
    leaves
        .reader
        .get_ref()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    drop(leaves);
    server.wait_metric("loip_requests_total{outcome=\"cancelled\"}", 1.0);
    let (_, done) = stays.rest_text();
    assert!(done, "the other stream did not end with [DONE]");
    let t0 = Instant::now();
    while server.metric("loip_active_sequences") > 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "a sequence stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that leaves while waiting for a whole (not streamed) answer:
/// its sequence is cancelled too.
#[test]
fn disconnect_before_a_whole_answer_cancels_it() {
    let server = Server::start(&[]);
    let body = json!({"prompt": "Write a very long story.", "max_tokens": 3000,
                      "temperature": 1.0, "seed": 5})
    .to_string();
    let mut s = TcpStream::connect(server.addr).unwrap();
    serve_util::send(&mut s, "POST", "/v1/completions", &[], body.as_bytes());
    server.wait_metric("loip_active_sequences", 1.0);
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    server.wait_metric("loip_requests_total{outcome=\"cancelled\"}", 1.0);
    assert_eq!(server.metric("loip_requests_total{outcome=\"ok\"}"), 0.0);
}

/// Slowloris: a client that never finishes its headers is cut at the
/// header timeout, and others are served meanwhile.
#[test]
fn slow_headers_are_cut_off() {
    let server = Server::start(&["--header-timeout", "1"]);
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(server.get("/health").status, 200);
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let n = slow.read_to_end(&mut buf);
    let waited = t0.elapsed();
    assert!(n.is_ok(), "the connection was not closed: {n:?}");
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    // An idle keep-alive connection is closed too.
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t0 = Instant::now();
    let _ = idle.read_to_end(&mut buf);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// A streaming client that stops reading never holds up the others. (That
/// its sequence is dropped after the stall timeout is tested on the
/// scheduler's outbox: filling loopback's socket buffers would take tens
/// of thousands of tokens.)
#[test]
fn a_client_that_never_reads_blocks_nobody() {
    let server = Server::start(&["--stall-timeout", "1"]);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0,
                      "seed": 3, "stream": true})
    .to_string();
    let mut s = TcpStream::connect(server.addr).unwrap();
    shrink_receive_buffer(&s);
    serve_util::send(&mut s, "POST", "/v1/completions", &[], body.as_bytes());
    for _ in 0..3 {
        let r = server.post("/v1/chat/completions", &chat_body("Say hi", 4, false));
        assert_eq!(r.status, 200);
    }
    assert_eq!(server.get("/health").status, 200);
    drop(s);
}

fn shrink_receive_buffer(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4096;
    // SAFETY: a plain setsockopt on an open socket with a valid int.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The endpoint is announced over mDNS as `_loip-chat._tcp` with its port
/// and model; on a loopback address it is not announced.
#[test]
fn announced_over_mdns() {
    use loip::serve::discovery::CHAT_SERVICE;
    use mdns_sd::{ServiceDaemon, ServiceEvent};
    let server = Server::start_on("0.0.0.0", &[]);
    let port = server.addr.port();
    let browser = ServiceDaemon::new().unwrap();
    let events = browser.browse(CHAT_SERVICE).unwrap();
    let t0 = Instant::now();
    let found = loop {
        let left = Duration::from_secs(20).saturating_sub(t0.elapsed());
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(s)) if s.port == port => break Some(s),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    let _ = browser.shutdown();
    let s = found.expect("no _loip-chat._tcp announcement with our port within 20 s");
    assert_eq!(
        s.get_property_val_str("model"),
        Some("SmolLM2-135M-Instruct.Q4_1")
    );
    assert_eq!(s.get_property_val_str("api"), Some("/v1"));
}

#[test]
fn context_option_bounds_every_sequence() {
    let server = Server::start(&["--context", "64", "--max-batch", "2"]);
    let chat = "/v1/chat/completions";
    // 16 prompt tokens + 60 is past 64: 400 naming the configured limit.
    let r = server.post(
        chat,
        &chat_body("What is the capital of France?", 60, false),
    );
    assert_eq!(r.status, 400);
    assert!(r.error().contains("64 tokens"), "{}", r.error());
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let r = server.post(chat, &chat_body("What is the capital of France?", 8, false));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        server.get("/v1/models").json()["data"][0]["context_length"],
        64
    );

    // Longer than the model's: a one-line error at start, exit code 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--no-mdns"])
        .args(["--context", "9000", "--model"])
        .arg(serve_util::common::smollm2())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().any(|l| l
            == "error: --context 9000 is longer than the model's context of 8192 tokens"),
        "{err}"
    );
}
