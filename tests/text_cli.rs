//! Text in, text out, end to end: `loip tokenize`, `loip generate --prompt /
//! --chat` with sampling and streaming, and `loip chat`, on the real model
//! against the greedy fixtures, plus every kind of bad text input. A few
//! checks use the library directly: the template choice, the streaming
//! callback and UTF-8 characters split across tokens.
//!
//! Model-running commands use one thread: tests run in parallel on small
//! machines.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use loip::engine::generate::Engine;
use loip::engine::sampler::{FinishReason, SamplingParams, TextStream};
use loip::engine::session::ChatSession;
use loip::engine::textgen::Request;
use loip::engine::weights::Model;
use loip::model::chat::{ChatMessage, ChatTemplate, Role, TemplateChoice};
use loip::model::dtype::GgmlType;
use loip::model::gguf::{Array, Gguf, GgufWriter, Value};
use loip::model::synth::SynthSpec;
use loip::model::tokenizer::Tokenizer;
use serde_json::Value as Json;
use tempfile::TempDir;

/// A gap between the two largest logits below this is a near tie: either
/// token is right (fixtures README).
const NEAR_TIE: f64 = 0.05;

/// What SmolLM2's own template puts first when a chat has no system message.
const SMOLLM2_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

// ---------------------------------------------------------------------------
// Running the binary

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn loip_with_input<S: AsRef<std::ffi::OsStr>>(args: &[S], stdin: &[u8]) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the loip binary");
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    // A command that never reads its input may close the pipe early.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let o = child.wait_with_output().expect("waiting for loip");
    writer.join().unwrap();
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn loip<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    loip_with_input(args, b"")
}

fn shown<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<&std::ffi::OsStr> {
    args.iter().map(|a| a.as_ref()).collect()
}

/// Runs a command that must succeed.
fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    let o = loip(args);
    assert_eq!(o.code, Some(0), "loip {:?}: {}", shown(args), o.stderr);
    o
}

/// Runs a command that must succeed and print one JSON object.
fn ok_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Json {
    let o = ok(args);
    assert_eq!(o.stdout.lines().count(), 1, "one JSON line: {}", o.stdout);
    serde_json::from_str(&o.stdout).expect("valid JSON")
}

/// Checks that a run failed with exit code 1 and one line on stderr that
/// mentions each of `needles`.
fn assert_fails(o: &Out, what: &str, needles: &[&str]) -> String {
    assert_eq!(o.code, Some(1), "{what}: exit code; stderr {}", o.stderr);
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("internal error"),
        "{what} panicked: {}",
        o.stderr
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line, got {:?}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for n in needles {
        assert!(
            lines[0].contains(n),
            "{what}: {:?} does not mention {n:?}",
            lines[0]
        );
    }
    lines[0].to_string()
}

/// Runs a command that must fail as [`assert_fails`] says, printing nothing
/// on stdout.
fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S], needles: &[&str]) -> String {
    let o = loip(args);
    let line = assert_fails(&o, &format!("loip {:?}", shown(args)), needles);
    assert!(o.stdout.is_empty(), "nothing on stdout: {}", o.stdout);
    line
}

fn real() -> String {
    common::smollm2().to_str().unwrap().to_string()
}

fn as_ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

// ---------------------------------------------------------------------------
// The fixtures

struct Fixture {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    gaps: Vec<f64>,
    greedy_text: String,
}

impl Fixture {
    /// How many leading greedy ids any correct engine reproduces: up to the
    /// first near tie, all of them where there is none.
    fn exact_prefix(&self) -> usize {
        self.gaps
            .iter()
            .position(|&g| g < NEAR_TIE)
            .unwrap_or(self.greedy_ids.len())
    }
}

fn fixtures() -> Vec<Fixture> {
    let path = common::fixtures_dir().join("smollm2/greedy.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let fixtures: Vec<Fixture> = text
        .lines()
        .map(|line| {
            let v: Json = serde_json::from_str(line).unwrap();
            Fixture {
                prompt: v["prompt"].as_str().unwrap().to_string(),
                prompt_ids: as_ids(&v["prompt_ids"]),
                greedy_ids: as_ids(&v["greedy_ids"]),
                gaps: v["gaps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_f64().unwrap())
                    .collect(),
                greedy_text: v["greedy_text"].as_str().unwrap().to_string(),
            }
        })
        .collect();
    assert!(fixtures.len() >= 6, "expected the six fixture chats");
    fixtures
}

fn smollm2_gguf() -> Gguf {
    Gguf::open(&common::smollm2()).expect("opening SmolLM2")
}

fn smollm2_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(smollm2_gguf().metadata()).unwrap()
}

fn smollm2_engine() -> Engine {
    let model = Model::open(&common::smollm2()).expect("loading SmolLM2");
    Engine::new(Arc::new(model), 1)
}

// ---------------------------------------------------------------------------
// Chat templates

#[test]
fn auto_template_reproduces_the_fixture_prompts_and_model_adds_smollm2_system() {
    let gguf = smollm2_gguf();
    let tok = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    let meta = gguf.metadata();
    let auto = ChatTemplate::for_model(meta, &tok, TemplateChoice::Auto).unwrap();
    let model = ChatTemplate::for_model(meta, &tok, TemplateChoice::Model).unwrap();
    let chatml = ChatTemplate::for_model(meta, &tok, TemplateChoice::Chatml).unwrap();
    assert_eq!(TemplateChoice::default(), TemplateChoice::Auto);
    assert!(
        model.source().contains("SmolLM"),
        "the model's own template"
    );
    let mut without_system = 0;
    for f in fixtures() {
        let messages = common::chat::parse_chatml(&f.prompt);
        let rendered = auto.render(&messages, true).unwrap();
        assert_eq!(rendered, f.prompt);
        assert_eq!(tok.encode_prompt(&rendered).unwrap(), f.prompt_ids);
        assert_eq!(chatml.render(&messages, true).unwrap(), f.prompt);
        if messages[0].role != Role::System {
            without_system += 1;
            assert_eq!(
                model.render(&messages, true).unwrap(),
                format!("{SMOLLM2_DEFAULT_SYSTEM}{}", f.prompt)
            );
        }
    }
    assert!(without_system >= 1);
}

#[test]
fn auto_template_keeps_templates_that_are_not_plain_chatml() {
    let tok = smollm2_tokenizer();
    let with_template = |source: &str| {
        let mut w = GgufWriter::new();
        w.add_kv("tokenizer.chat_template", Value::String(source.into()));
        Gguf::from_bytes(w.to_bytes().unwrap()).unwrap()
    };
    let chat = [ChatMessage::new(Role::User, "hi")];
    let plain_chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";

    // Not ChatML at all: the model's own.
    let g = with_template("[{{ messages[0].content }}]");
    let t = ChatTemplate::for_model(g.metadata(), &tok, TemplateChoice::Auto).unwrap();
    assert_eq!(t.render(&chat, true).unwrap(), "[hi]");
    // Phi-4's ChatML variant: llama.cpp tells it apart, so the model's own.
    let g = with_template("<|im_start|><|im_sep|>{{ messages[0].content }}");
    let t = ChatTemplate::for_model(g.metadata(), &tok, TemplateChoice::Auto).unwrap();
    assert_eq!(t.render(&chat, true).unwrap(), "<|im_start|><|im_sep|>hi");
    // ChatML-shaped: plain ChatML, as llama.cpp renders it.
    let g = with_template("{{ '<|im_start|>' }}custom");
    let t = ChatTemplate::for_model(g.metadata(), &tok, TemplateChoice::Auto).unwrap();
    assert_eq!(t.render(&chat, true).unwrap(), plain_chatml);
    let t = ChatTemplate::for_model(g.metadata(), &tok, TemplateChoice::Model).unwrap();
    assert_eq!(t.render(&chat, true).unwrap(), "<|im_start|>custom");
    // No template: ChatML, whatever the choice.
    let g = Gguf::from_bytes(GgufWriter::new().to_bytes().unwrap()).unwrap();
    for choice in [
        TemplateChoice::Auto,
        TemplateChoice::Model,
        TemplateChoice::Chatml,
    ] {
        let t = ChatTemplate::for_model(g.metadata(), &tok, choice).unwrap();
        assert_eq!(t.render(&chat, true).unwrap(), plain_chatml);
    }
    for name in TemplateChoice::NAMES {
        assert!(TemplateChoice::from_name(name).is_some());
    }
    assert_eq!(TemplateChoice::from_name("jinja"), None);
}

#[test]
fn chat_template_flag_selects_the_rendering() {
    let m = real();
    let tok = smollm2_tokenizer();
    let first = &fixtures()[0];
    let message = common::chat::parse_chatml(&first.prompt)[0].content.clone();
    let run = |which: &str| {
        let v = ok_json(&[
            "generate",
            "--model",
            &m,
            "--chat",
            &message,
            "--chat-template",
            which,
            "--max-tokens",
            "1",
            "--threads",
            "1",
            "--json",
        ]);
        as_ids(&v["prompt_ids"])
    };
    assert_eq!(run("auto"), first.prompt_ids);
    assert_eq!(run("chatml"), first.prompt_ids);
    let with_system = format!("{SMOLLM2_DEFAULT_SYSTEM}{}", first.prompt);
    assert_eq!(run("model"), tok.encode_prompt(&with_system).unwrap());
}

// ---------------------------------------------------------------------------
// generate --chat / --prompt on the real model

#[test]
fn every_fixture_chat_reproduces_the_greedy_ids_and_text() {
    let m = real();
    let tok = smollm2_tokenizer();
    for (n, f) in fixtures().iter().enumerate() {
        let messages = common::chat::parse_chatml(&f.prompt);
        let mut args: Vec<String> = ["generate", "--model", &m, "--temperature", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for msg in &messages {
            let flag = match msg.role {
                Role::System => "--system",
                Role::User => "--chat",
                Role::Assistant => panic!("fixture {n}: no assistant turns expected"),
            };
            args.extend([flag.to_string(), msg.content.clone()]);
        }
        args.extend(
            ["--max-tokens", "48", "--threads", "1", "--json"]
                .iter()
                .map(|s| s.to_string()),
        );
        let v = ok_json(&args);
        assert_eq!(as_ids(&v["prompt_ids"]), f.prompt_ids, "fixture {n}");
        let tokens = as_ids(&v["tokens"]);
        let text = v["text"].as_str().expect("text");
        let exact = f.exact_prefix();
        assert!(tokens.len() >= exact, "fixture {n}: {tokens:?}");
        assert_eq!(
            tokens[..exact],
            f.greedy_ids[..exact],
            "fixture {n}: the ids before the first near tie (step {exact})"
        );
        assert_eq!(text, tok.decode(&tokens, true), "fixture {n}");
        if exact == f.greedy_ids.len() {
            assert_eq!(tokens, f.greedy_ids, "fixture {n}");
            assert_eq!(text, f.greedy_text, "fixture {n}");
            let reason = if tokens.last() == Some(&2) {
                "stop_token"
            } else {
                "max_tokens"
            };
            assert_eq!(v["finish_reason"], reason, "fixture {n}");
        }
        for k in ["prefill_tok_s", "decode_tok_s"] {
            assert!(v["timings"][k].as_f64().is_some(), "timings.{k}");
        }
    }
}

#[test]
fn prompt_text_and_prompt_ids_agree() {
    // --prompt takes the text as it is: the first fixture's ChatML prompt
    // gives its ids and its greedy answer.
    let m = real();
    let f = &fixtures()[0];
    let v = ok_json(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        &f.prompt,
        "--max-tokens",
        "48",
        "--threads",
        "1",
        "--json",
    ]);
    assert_eq!(as_ids(&v["prompt_ids"]), f.prompt_ids);
    assert_eq!(as_ids(&v["tokens"]), f.greedy_ids);
    assert_eq!(v["text"], f.greedy_text.as_str());

    // Human output: the text and a newline.
    let o = ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        &f.prompt,
        "--threads",
        "1",
    ]);
    assert_eq!(o.stdout, format!("{}\n", f.greedy_text));
}

#[test]
fn the_same_seed_gives_the_same_sample_and_another_seed_another() {
    let m = real();
    let sample = |seed: &str| {
        let v = ok_json(&[
            "generate",
            "--model",
            &m,
            "--chat",
            "Tell me a story about a dragon.",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-tokens",
            "24",
            "--threads",
            "1",
            "--json",
        ]);
        (
            as_ids(&v["tokens"]),
            v["text"].as_str().unwrap().to_string(),
        )
    };
    let a = sample("1");
    assert_eq!(sample("1"), a, "seed 1 twice");
    let b = sample("2");
    assert_ne!(b.0, a.0, "seeds 1 and 2 give the same tokens");
    assert_ne!(b.1, a.1, "seeds 1 and 2 give the same text");
}

#[test]
fn streamed_output_is_the_final_text() {
    let m = real();
    let args = |stream: bool| {
        let mut a = vec![
            "generate",
            "--model",
            &m,
            "--chat",
            "Write a short poem about the sea.",
            "--max-tokens",
            "40",
            "--threads",
            "1",
        ];
        a.push(if stream { "--stream" } else { "--json" });
        a
    };
    let v = ok_json(&args(false));
    let text = v["text"].as_str().unwrap();
    assert!(text.len() > 40, "{text}");
    let o = ok(&args(true));
    assert_eq!(o.stdout, format!("{text}\n"));
}

/// The answer to this chat, greedy, is Japanese: characters of three bytes
/// that byte-level BPE splits across tokens.
const JAPANESE_CHAT: &str = "How do you say hello in Japanese?";

#[test]
fn characters_split_across_generated_tokens_come_out_whole() {
    let m = real();
    let tok = smollm2_tokenizer();
    let v = ok_json(&[
        "generate",
        "--model",
        &m,
        "--chat",
        JAPANESE_CHAT,
        "--max-tokens",
        "24",
        "--threads",
        "1",
        "--json",
    ]);
    let tokens = as_ids(&v["tokens"]);
    let text = v["text"].as_str().unwrap();
    let partial = tokens
        .iter()
        .filter(|&&id| std::str::from_utf8(tok.token_bytes(id)).is_err())
        .count();
    assert!(
        partial > 0,
        "the answer has no character split across tokens: {text:?} {tokens:?}"
    );
    assert!(!text.contains('\u{FFFD}'), "{text:?}");
    assert!(text.chars().any(|c| c.len_utf8() > 1), "{text:?}");
    assert_eq!(text, tok.decode(&tokens, true));

    // Streamed, the same characters, whole.
    let o = ok(&[
        "generate",
        "--model",
        &m,
        "--chat",
        JAPANESE_CHAT,
        "--max-tokens",
        "24",
        "--threads",
        "1",
        "--stream",
    ]);
    assert_eq!(o.stdout, format!("{text}\n"));
}

#[test]
fn text_stream_holds_back_partial_characters() {
    let tok = smollm2_tokenizer();
    // "世" and "🦀" are each split over several tokens in SmolLM2's vocabulary.
    let text = "a 世界 🦀!";
    let ids = tok.encode(text, false).unwrap();
    let split = ids
        .iter()
        .filter(|&&id| std::str::from_utf8(tok.token_bytes(id)).is_err())
        .count();
    assert!(split >= 2, "{ids:?}");
    let mut stream = TextStream::new(&tok, &SamplingParams::greedy());
    let mut pieces = Vec::new();
    for &id in &ids {
        let step = stream.push(id);
        assert!(step.finish.is_none());
        assert!(!step.text.contains('\u{FFFD}'), "{:?}", step.text);
        pieces.push(step.text.to_string());
    }
    pieces.push(stream.finish().to_string());
    assert_eq!(pieces.concat(), text);
    // Some tokens gave nothing (the start of a character), and each
    // character appeared whole in one piece.
    assert!(pieces.iter().any(String::is_empty), "{pieces:?}");
    for c in ['世', '🦀'] {
        assert!(
            pieces.iter().any(|p| p.contains(c)),
            "{c} is never whole: {pieces:?}"
        );
    }
}

#[test]
fn library_streams_pieces_that_add_up_to_the_text() {
    let mut engine = smollm2_engine();
    let tok = smollm2_tokenizer();
    let f = &fixtures()[1];
    let params = SamplingParams {
        max_tokens: Some(20),
        ..SamplingParams::greedy()
    };
    let mut pieces = Vec::new();
    let c = engine
        .generate_text(&tok, &Request::new(&f.prompt_ids, &params), |p| {
            pieces.push(p.to_string())
        })
        .unwrap();
    assert!(pieces.len() > 5, "text given as it is made: {pieces:?}");
    assert_eq!(c.text.as_deref(), Some(pieces.concat().as_str()));
    assert_eq!(c.tokens, f.greedy_ids[..20]);
    assert_eq!(c.finish_reason, FinishReason::MaxTokens);

    // Greedy sampling takes generate_greedy's argmax.
    let g = engine.generate_greedy(&f.prompt_ids, 20, None).unwrap();
    assert_eq!(g.tokens, c.tokens);

    // A cancel flag already set: nothing is generated.
    let cancel = AtomicBool::new(true);
    let request = Request {
        prompt: &f.prompt_ids,
        params: &params,
        cancel: Some(&cancel),
    };
    let c = engine.generate_text(&tok, &request, |_| ()).unwrap();
    assert_eq!(c.finish_reason, FinishReason::Cancelled);
    assert!(c.tokens.is_empty());
    assert_eq!(c.text.as_deref(), Some(""));
}

#[test]
fn session_keeps_the_history() {
    let tok = smollm2_tokenizer();
    let gguf = smollm2_gguf();
    let template = ChatTemplate::for_model(gguf.metadata(), &tok, TemplateChoice::Auto).unwrap();
    let params = SamplingParams {
        max_tokens: Some(48),
        ..SamplingParams::greedy()
    };
    let mut session = ChatSession::new(smollm2_engine(), tok, template, params).unwrap();
    let f = &fixtures()[0];
    let question = &common::chat::parse_chatml(&f.prompt)[0].content;
    let first = session.reply(question, None, |_| ()).unwrap();
    assert_eq!(first.prompt, f.prompt);
    assert_eq!(first.completion.tokens, f.greedy_ids);
    let second = session.reply("And of Spain?", None, |_| ()).unwrap();
    assert_eq!(
        second.prompt,
        format!(
            "{}{}<|im_end|>\n<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n",
            f.prompt, f.greedy_text
        )
    );
    assert_eq!(session.messages().len(), 4);
    assert_eq!(session.messages()[3].role, Role::Assistant);
}

// ---------------------------------------------------------------------------
// loip chat

#[test]
fn chat_keeps_the_conversation_and_streams_answers() {
    let m = real();
    let args = [
        "chat",
        "--model",
        &m,
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--threads",
        "1",
    ];
    let input = b"Hello\nWhat is 2+2?\n";
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let o = loip_with_input(&json_args, input);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let turns: Vec<Json> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line per answer"))
        .collect();
    assert_eq!(turns.len(), 2, "{}", o.stdout);
    let first_text = turns[0]["text"].as_str().unwrap();
    assert!(!first_text.is_empty());
    assert_eq!(
        turns[0]["prompt"],
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    // The second prompt carries the first exchange.
    let second = turns[1]["prompt"].as_str().unwrap();
    assert_eq!(
        second,
        format!(
            "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n{first_text}<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        )
    );
    let tok = smollm2_tokenizer();
    assert_eq!(
        as_ids(&turns[1]["prompt_ids"]),
        tok.encode_prompt(second).unwrap()
    );

    // Without --json: the answers, one line each, as streamed.
    let o = loip_with_input(&args, input);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let expected: String = turns
        .iter()
        .map(|t| format!("{}\n", t["text"].as_str().unwrap()))
        .collect();
    assert_eq!(o.stdout, expected);
    assert!(o.stderr.is_empty(), "{}", o.stderr);
}

#[test]
fn chat_with_system_message_and_end_of_input() {
    let m = real();
    let f = &fixtures()[2];
    let messages = common::chat::parse_chatml(&f.prompt);
    assert_eq!(messages[0].role, Role::System);
    let args = [
        "chat",
        "--model",
        &m,
        "--system",
        &messages[0].content,
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--json",
    ];
    let input = format!("{}\n", messages[1].content);
    let o = loip_with_input(&args, input.as_bytes());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: Json = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(v["prompt"], f.prompt.as_str());
    assert_eq!(as_ids(&v["tokens"]), f.greedy_ids[..4]);

    // No input at all: nothing to answer, a clean exit.
    let o = loip_with_input(&args, b"");
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.is_empty());
}

#[test]
fn chat_skips_a_line_that_is_not_utf8_and_says_so() {
    let m = real();
    let args = [
        "chat",
        "--model",
        &m,
        "--max-tokens",
        "2",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--json",
    ];
    let o = loip_with_input(&args, b"Hello\n\xff\xfe oops\nBye\n");
    let line = assert_fails(&o, "chat with a bad line", &["line 2", "UTF-8"]);
    assert!(line.contains("skipped"), "{line}");
    // The other two messages were answered.
    assert_eq!(o.stdout.lines().count(), 2, "{}", o.stdout);
}

// ---------------------------------------------------------------------------
// loip tokenize

#[test]
fn tokenize_matches_the_library() {
    let m = real();
    let tok = smollm2_tokenizer();
    let text = "<|im_start|>user\nHello, 世界 🦀<|im_end|>";
    let v = ok_json(&["tokenize", "--model", &m, text, "--json"]);
    let ids = as_ids(&v["ids"]);
    assert_eq!(ids, tok.encode(text, true).unwrap());
    assert_eq!(ids[0], 1, "<|im_start|> is one token");
    let pieces: Vec<&str> = v["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(pieces.len(), ids.len());
    assert_eq!(pieces[0], "<|im_start|>");

    // --no-special: control tokens are plain text.
    let v = ok_json(&["tokenize", "--model", &m, text, "--no-special", "--json"]);
    assert_eq!(as_ids(&v["ids"]), tok.encode(text, false).unwrap());
    assert!(!as_ids(&v["ids"]).contains(&1));

    // Human form: one line per token, the id then the quoted piece; bytes
    // of a partial character escaped.
    let o = ok(&["tokenize", "--model", &m, text]);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), ids.len());
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["1", "\"<|im_start|>\""]
    );
    assert!(o.stdout.contains("\\x"), "{}", o.stdout);

    // `-` reads standard input.
    let o = loip_with_input(&["tokenize", "--model", &m, "-", "--json"], text.as_bytes());
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let v: Json = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(as_ids(&v["ids"]), ids);
}

// ---------------------------------------------------------------------------
// Bad input

#[test]
fn invalid_sampling_parameters_name_the_parameter() {
    let m = real();
    for (flag, value, name) in [
        ("--top-p", "1.5", "top_p"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "-0.5", "top_p"),
        ("--temperature", "-1", "temperature"),
        ("--temperature", "NaN", "temperature"),
        ("--temperature", "inf", "temperature"),
        ("--max-tokens", "0", "max_tokens"),
    ] {
        for cmd in ["generate", "chat"] {
            let mut args = vec![cmd, "--model", &m, flag, value];
            if cmd == "generate" {
                args.extend(["--chat", "hi"]);
            }
            fails(&args, &[name, value]);
        }
    }
    // A malformed number is a usage error.
    let o = loip(&["generate", "--model", &m, "--chat", "hi", "--top-k", "-1"]);
    assert_eq!(o.code, Some(2), "{}", o.stderr);
}

#[test]
fn text_that_is_not_utf8_is_rejected() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    let m = real();
    let bad = || OsString::from_vec(b"caf\xe9".to_vec());
    let arg = |s: &str| OsString::from(s);
    let base = || vec![arg("generate"), arg("--model"), arg(&m)];
    let mut a = base();
    a.extend([arg("--prompt"), bad()]);
    fails(&a, &["--prompt", "UTF-8"]);
    let mut a = base();
    a.extend([arg("--chat"), bad()]);
    fails(&a, &["--chat", "UTF-8"]);
    let mut a = base();
    a.extend([arg("--chat"), arg("hi"), arg("--system"), bad()]);
    fails(&a, &["--system", "UTF-8"]);
    fails(
        &[arg("chat"), arg("--model"), arg(&m), arg("--system"), bad()],
        &["--system", "UTF-8"],
    );
    fails(
        &[arg("tokenize"), arg("--model"), arg(&m), bad()],
        &["not valid UTF-8", "index 3"],
    );
    let o = loip_with_input(&["tokenize", "--model", &m, "-"], b"caf\xe9");
    assert_fails(&o, "tokenize -", &["standard input", "not valid UTF-8"]);
}

/// A temp dir holding a tiny synthetic model (vocabulary 512, context 256)
/// written with `kvs` added to its metadata.
fn tiny_with(kvs: Vec<(&str, Value)>) -> (TempDir, String) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut w = SynthSpec::tiny(GgmlType::Q4_1).writer();
    for (k, v) in kvs {
        w.add_kv(k, v);
    }
    w.write(&path).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

/// GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the
/// rest are U+0100 onwards in byte order.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        char::from_u32(0x100 + (0..b).filter(|&x| !printable(x)).count() as u32).unwrap()
    }
}

/// A byte-level BPE tokenizer of 512 tokens, the tiny model's vocabulary:
/// SmolLM2's three special tokens first (the synthetic model's EOS is 2),
/// then every byte, then filler.
fn tiny_tokenizer_kvs(pre: &str) -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    let mut types = vec![3i32; 3];
    types.extend(std::iter::repeat_n(1, 256));
    while tokens.len() < 512 {
        tokens.push(format!("filler{}", tokens.len()));
        types.push(1);
    }
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", Value::Array(Array::String(tokens))),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(types))),
        (
            "tokenizer.ggml.merges",
            Value::Array(Array::String(Vec::new())),
        ),
    ]
}

#[test]
fn synthetic_model_with_a_tokenizer_generates_text() {
    let (_dir, m) = tiny_with(tiny_tokenizer_kvs("gpt2"));
    let v = ok_json(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "hi",
        "--max-tokens",
        "5",
        "--threads",
        "1",
        "--json",
    ]);
    assert_eq!(
        as_ids(&v["prompt_ids"]),
        [
            1,
            3 + b'u' as u32,
            3 + b's' as u32,
            3 + b'e' as u32,
            3 + b'r' as u32
        ]
        .into_iter()
        .chain([3 + b'\n' as u32, 3 + b'h' as u32, 3 + b'i' as u32, 2])
        .chain([3 + b'\n' as u32, 1])
        .chain("assistant\n".bytes().map(|b| 3 + b as u32))
        .collect::<Vec<_>>()
    );
    assert!(v["text"].is_string());
    let o = ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "abc",
        "--temperature",
        "0.9",
        "--top-k",
        "5",
        "--seed",
        "3",
        "--max-tokens",
        "5",
        "--threads",
        "1",
        "--stream",
    ]);
    assert!(o.stdout.ends_with('\n'));
    let o = loip_with_input(
        &["chat", "--model", &m, "--max-tokens", "3", "--threads", "1"],
        b"one\ntwo\n",
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
}

#[test]
fn model_without_tokenizer_names_the_missing_key() {
    let (_dir, m) = tiny_with(Vec::new());
    let key = "tokenizer.ggml.model";
    fails(&["generate", "--model", &m, "--prompt", "hi"], &[key]);
    fails(&["generate", "--model", &m, "--chat", "hi"], &[key]);
    fails(&["tokenize", "--model", &m, "hi"], &[key]);
    let o = loip_with_input(&["chat", "--model", &m], b"hi\n");
    assert_fails(&o, "chat", &[key]);
    // Token ids need no tokenizer.
    let v = ok_json(&[
        "generate",
        "--model",
        &m,
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "3",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(v.get("text").is_none(), "{v}");
}

#[test]
fn unknown_tokenizer_or_pre_tokenizer_names_the_value() {
    let (_dir, m) = tiny_with(tiny_tokenizer_kvs("nonsense"));
    for args in [
        vec!["generate", "--model", &m, "--prompt", "hi"],
        vec!["generate", "--model", &m, "--prompt-ids", "1,2"],
        vec!["tokenize", "--model", &m, "hi"],
    ] {
        fails(&args, &["nonsense", "tokenizer.ggml.pre"]);
    }
    let mut kvs = tiny_tokenizer_kvs("gpt2");
    kvs[0].1 = Value::String("wordpiece".into());
    let (_dir, m) = tiny_with(kvs);
    fails(
        &["generate", "--model", &m, "--chat", "hi"],
        &["wordpiece", "tokenizer.ggml.model"],
    );
}

#[test]
fn template_errors_carry_minijinja_message() {
    let with_template = |source: &str| {
        let mut kvs = tiny_tokenizer_kvs("gpt2");
        kvs.push(("tokenizer.chat_template", Value::String(source.into())));
        tiny_with(kvs)
    };
    // raise_exception's message, as transformers' templates use it.
    let (_dir, m) = with_template("{{ raise_exception('roles must alternate user/assistant') }}");
    fails(
        &["generate", "--model", &m, "--chat", "hi"],
        &["render", "roles must alternate user/assistant"],
    );
    let o = loip_with_input(&["chat", "--model", &m, "--threads", "1"], b"hi\n");
    assert_fails(&o, "chat", &["roles must alternate user/assistant"]);
    // A template that does not parse: minijinja's own words.
    let (_dir, m) = with_template("{% for m in messages %}{{ m.content }}");
    fails(
        &["generate", "--model", &m, "--chat", "hi"],
        &["compile", "syntax error", "end of block"],
    );
    // --chat-template chatml sidesteps a broken template.
    ok(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "hi",
        "--chat-template",
        "chatml",
        "--max-tokens",
        "2",
        "--threads",
        "1",
    ]);
}

#[test]
fn usage_errors_exit_with_2() {
    let m = real();
    for args in [
        vec!["generate", "--model", &m, "--prompt", "a", "--chat", "b"],
        vec!["generate", "--model", &m, "--prompt", "a", "--system", "s"],
        vec![
            "generate", "--model", &m, "--chat", "a", "--stream", "--json",
        ],
        vec!["generate", "--model", &m, "--prompt-ids", "1", "--stream"],
        vec![
            "generate",
            "--model",
            &m,
            "--chat",
            "a",
            "--chat-template",
            "x",
        ],
        vec!["tokenize", "--model", &m],
    ] {
        let o = loip(&args);
        assert_eq!(o.code, Some(2), "loip {args:?}: {}", o.stderr);
        assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
    }
}

#[test]
fn bad_model_files_are_one_error_line_for_text_commands() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("no-such-model.gguf");
    let missing = missing.to_str().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"these are not weights\n").unwrap();
    let text = text.to_str().unwrap();
    for (m, needles) in [
        (missing, ["no-such-model.gguf", "No such file"]),
        (text, ["notes.txt", "not a GGUF file"]),
    ] {
        fails(&["tokenize", "--model", m, "hi"], &needles);
        fails(&["generate", "--model", m, "--prompt", "hi"], &needles);
        fails(&["generate", "--model", m, "--chat", "hi"], &needles);
        let o = loip_with_input(&["chat", "--model", m], b"hi\n");
        assert_fails(&o, "chat", &needles);
    }
}

/// Ctrl-C (SIGINT) while an answer streams stops that answer, not the chat.
#[test]
fn sigint_stops_the_answer_and_the_chat_goes_on() {
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    let m = real();
    let mut child = Command::new(env!("CARGO_BIN_EXE_loip"))
        .args(["chat", "--model", &m, "--temperature", "0"])
        .args(["--max-tokens", "400", "--threads", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the loip binary");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Greedy, this story runs to the 400-token limit (about ten seconds on
    // one thread) unless it is stopped.
    stdin
        .write_all(b"Write a long story about a dragon.\n")
        .unwrap();
    while out.len() < 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        out.extend(rx.recv_timeout(left).expect("the answer starts"));
    }
    // SAFETY: kill has no memory effects; the pid is our live child's.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(rc, 0);
    // The cut answer ends with a newline, and then nothing more comes.
    loop {
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(chunk) => out.extend(chunk),
            Err(_) if out.ends_with(b"\n") => break,
            Err(e) => panic!("the answer did not end: {e}"),
        }
        assert!(Instant::now() < deadline, "the answer did not stop");
    }
    let first = String::from_utf8(out.clone()).unwrap();
    let tok = smollm2_tokenizer();
    let n = tok.encode(first.trim_end(), false).unwrap().len();
    assert!(
        n < 200,
        "the answer went on after Ctrl-C: {n} tokens: {first}"
    );

    // The chat goes on: the next message is answered, then the input ends.
    stdin.write_all(b"What is 2+2?\n").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    reader.join().unwrap();
    while let Ok(chunk) = rx.try_recv() {
        out.extend(chunk);
    }
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let all = String::from_utf8(out).unwrap();
    let second = &all[first.len()..];
    assert!(
        second.len() > 1 && second.ends_with('\n'),
        "no second answer: {all}"
    );
}
