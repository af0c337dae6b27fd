//! Tokenizer: the real SmolLM2 vocabulary against llama.cpp's ids in
//! `fixtures/smollm2/tokenize.jsonl`, small hand-built vocabularies whose
//! results are worked out from the algorithms by hand, and metadata errors.

mod common;

use loip::model::gguf::{Array, Gguf, GgufWriter, Metadata, Value};
use loip::model::tokenizer::{
    PreTokenizer, TokenType, Tokenizer, TokenizerError, TokenizerKind, TokenizerSpec,
};
use serde_json::Value as Json;

// ---------------------------------------------------------------------------
// The real model and the fixtures

fn fixture_lines(name: &str) -> Vec<Json> {
    let path = common::fixtures_dir().join("smollm2").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
        .collect()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

/// The real SmolLM2 model; a missing file fails the test.
fn smollm2() -> Gguf {
    let path = common::smollm2();
    Gguf::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn smollm2_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(smollm2().metadata()).expect("SmolLM2's tokenizer loads")
}

#[test]
fn smollm2_reproduces_llama_cpp_ids() {
    let tok = smollm2_tokenizer();
    let lines = fixture_lines("tokenize.jsonl");
    assert!(lines.len() >= 10);
    for line in &lines {
        let text = line["text"].as_str().unwrap();
        let special = line["special"].as_bool().unwrap();
        let want = ids(&line["ids"]);
        let got = tok.encode(text, special).unwrap();
        assert_eq!(got, want, "encoding {text:?}");
    }
}

#[test]
fn smollm2_decode_round_trips_every_fixture_text() {
    let tok = smollm2_tokenizer();
    for line in fixture_lines("tokenize.jsonl") {
        let text = line["text"].as_str().unwrap();
        assert_eq!(tok.decode(&ids(&line["ids"]), false), text);
    }
}

#[test]
fn smollm2_decode_gives_greedy_text() {
    let tok = smollm2_tokenizer();
    for line in fixture_lines("greedy.jsonl") {
        let generated = ids(&line["greedy_ids"]);
        assert_eq!(
            tok.decode(&generated, true),
            line["greedy_text"].as_str().unwrap()
        );
    }
}

#[test]
fn smollm2_special_tokens_and_flags() {
    let tok = smollm2_tokenizer();
    assert_eq!(tok.kind(), TokenizerKind::Bpe);
    assert_eq!(tok.pre_tokenizer(), Some(PreTokenizer::Smollm));
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    // No eot_token_id in the file: end of turn is EOS.
    assert_eq!(tok.eot(), Some(2));
    assert!(tok.is_eog(2) && tok.is_eog(0) && !tok.is_eog(1));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("Ġthe"), Some(260));
    assert!(tok.is_special(1) && !tok.is_special(260));
    assert_eq!(tok.token_type(1), Some(TokenType::Control));
    assert_eq!(tok.token_bytes(260), b" the");
    assert_eq!(tok.token_bytes(2), b"<|im_end|>");
    assert!(!tok.add_bos() && !tok.add_eos() && !tok.add_space_prefix());

    // Without `special`, a control token's text is plain text.
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain, false), "<|im_start|>user");
    // add_bos_token is false: a prompt is the text alone.
    let prompt = "<|im_start|>user\nHi<|im_end|>\n";
    assert_eq!(
        tok.encode_prompt(prompt).unwrap(),
        tok.encode(prompt, true).unwrap()
    );
    // Decoding hides special tokens on request.
    let ids = tok.encode(prompt, true).unwrap();
    assert_eq!(tok.decode(&ids, true), "user\nHi\n");
    // Ids outside the vocabulary decode to nothing.
    assert_eq!(tok.decode(&[u32::MAX, 260], false), " the");
    assert_eq!(tok.token_bytes(u32::MAX), b"");
}

#[test]
fn encode_bytes_rejects_invalid_utf8() {
    let tok = smollm2_tokenizer();
    assert_eq!(
        tok.encode_bytes(b"Hello, world!", true).unwrap(),
        vec![19556, 28, 905, 17]
    );
    let err = tok.encode_bytes(b"ab\xffcd", true).unwrap_err();
    assert!(matches!(err, TokenizerError::InvalidUtf8(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("UTF-8") && message.contains("index 2"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------
// Metadata errors

/// Metadata of a GGUF file holding `kvs` and no tensors.
fn metadata(kvs: Vec<(&str, Value)>) -> Metadata {
    let mut w = GgufWriter::new();
    for (k, v) in kvs {
        w.add_kv(k, v);
    }
    Gguf::from_bytes(w.to_bytes().unwrap())
        .unwrap()
        .metadata()
        .clone()
}

fn strings(v: &[&str]) -> Value {
    Value::Array(Array::String(v.iter().map(|s| s.to_string()).collect()))
}

/// A minimal valid byte-level BPE vocabulary: every byte, one merge.
fn tiny_bpe_kvs() -> Vec<(&'static str, Value)> {
    let mut tokens: Vec<String> = (0..=255u8).map(byte_char).map(String::from).collect();
    tokens.push("ab".into());
    vec![
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(Array::String(tokens))),
        ("tokenizer.ggml.merges", strings(&["a b"])),
    ]
}

fn error_for(kvs: Vec<(&str, Value)>) -> String {
    Tokenizer::from_gguf(&metadata(kvs))
        .expect_err("the metadata is invalid")
        .to_string()
}

fn replace(
    mut kvs: Vec<(&'static str, Value)>,
    key: &'static str,
    value: Value,
) -> Vec<(&'static str, Value)> {
    kvs.retain(|(k, _)| *k != key);
    kvs.push((key, value));
    kvs
}

#[test]
fn tiny_bpe_metadata_loads() {
    let tok = Tokenizer::from_gguf(&metadata(tiny_bpe_kvs())).unwrap();
    assert_eq!(tok.encode("abc", false).unwrap(), vec![256, b'c' as u32]);
    assert_eq!(tok.decode(&[256, b'c' as u32], false), "abc");
}

#[test]
fn model_without_tokenizer_is_an_error() {
    let msg = error_for(vec![(
        "general.architecture",
        Value::String("llama".into()),
    )]);
    assert!(msg.contains("tokenizer.ggml.model"), "{msg}");

    let kvs: Vec<_> = tiny_bpe_kvs()
        .into_iter()
        .filter(|(k, _)| *k != "tokenizer.ggml.tokens")
        .collect();
    let msg = error_for(kvs);
    assert!(msg.contains("tokenizer.ggml.tokens"), "{msg}");

    let kvs: Vec<_> = tiny_bpe_kvs()
        .into_iter()
        .filter(|(k, _)| *k != "tokenizer.ggml.merges")
        .collect();
    let msg = error_for(kvs);
    assert!(msg.contains("tokenizer.ggml.merges"), "{msg}");
}

#[test]
fn unknown_model_or_pre_tokenizer_names_the_value() {
    let msg = error_for(replace(
        tiny_bpe_kvs(),
        "tokenizer.ggml.model",
        Value::String("bert".into()),
    ));
    assert!(
        msg.contains("`bert`") && msg.contains("tokenizer.ggml.model"),
        "{msg}"
    );

    let msg = error_for(replace(
        tiny_bpe_kvs(),
        "tokenizer.ggml.pre",
        Value::String("klingon".into()),
    ));
    assert!(
        msg.contains("`klingon`") && msg.contains("tokenizer.ggml.pre"),
        "{msg}"
    );

    // A missing pre-tokenizer is llama.cpp's `default`.
    let kvs: Vec<_> = tiny_bpe_kvs()
        .into_iter()
        .filter(|(k, _)| *k != "tokenizer.ggml.pre")
        .collect();
    let tok = Tokenizer::from_gguf(&metadata(kvs)).unwrap();
    assert_eq!(tok.pre_tokenizer(), Some(PreTokenizer::Default));
}

#[test]
fn arrays_of_the_wrong_type_name_the_key() {
    let cases: Vec<(&str, Value)> = vec![
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::I32(vec![1, 2])),
        ),
        ("tokenizer.ggml.merges", Value::Array(Array::U8(vec![1]))),
        (
            "tokenizer.ggml.token_type",
            Value::Array(Array::F32(vec![1.0])),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(Array::String(vec!["x".into()])),
        ),
        ("tokenizer.ggml.model", Value::U32(2)),
        ("tokenizer.ggml.pre", strings(&["gpt2"])),
        ("tokenizer.ggml.bos_token_id", Value::String("1".into())),
        ("tokenizer.ggml.add_bos_token", Value::U8(1)),
    ];
    for (key, value) in cases {
        let msg = error_for(replace(tiny_bpe_kvs(), key, value));
        assert!(msg.contains(key), "{key}: {msg}");
    }
}

#[test]
fn inconsistent_values_name_the_key() {
    let n = 257;
    let cases: Vec<(&str, Value)> = vec![
        (
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(vec![1; 3])),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(n)),
        ("tokenizer.ggml.eos_token_id", Value::U32(u32::MAX)),
        ("tokenizer.ggml.merges", strings(&["a"])),
        ("tokenizer.ggml.merges", strings(&["a zz"])),
        ("tokenizer.ggml.tokens", strings(&["a", "b", "a"])),
        ("tokenizer.ggml.tokens", strings(&[])),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    for (key, value) in cases {
        let msg = error_for(replace(tiny_bpe_kvs(), key, value.clone()));
        assert!(msg.contains(key), "{key} = {value:?}: {msg}");
    }
}

// ---------------------------------------------------------------------------
// Byte-level BPE pre-tokenizers on a hand-made vocabulary

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

/// Every byte (id = byte value), then `extra` tokens from id 256 on.
fn bpe_spec(pre: &str, extra: &[&str], merges: &[&str]) -> TokenizerSpec {
    let mut tokens: Vec<String> = (0..=255u8).map(byte_char).map(String::from).collect();
    tokens.extend(extra.iter().map(|s| s.to_string()));
    TokenizerSpec {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        merges: merges.iter().map(|s| s.to_string()).collect(),
        // Llama 3 adds BOS by default, so it needs one.
        bos: Some(0),
        ..TokenizerSpec::default()
    }
}

#[test]
fn digit_handling_follows_the_pre_tokenizer() {
    // 256 = "12", 257 = "123"; merges 1+2, then 12+3.
    let extra = ["12", "123"];
    let merges = ["1 2", "12 3"];
    let encode = |pre: &str, text: &str| {
        Tokenizer::from_spec(bpe_spec(pre, &extra, &merges))
            .unwrap()
            .encode(text, false)
            .unwrap()
    };
    let d = |c: u8| c as u32;
    // gpt2: "3123" is one word: 3 12 3 → 3 123.
    assert_eq!(encode("gpt2", "3123"), vec![d(b'3'), 257]);
    // llama3 and default: groups of three digits, "312" and "3": 3 12 | 3.
    assert_eq!(encode("llama-bpe", "3123"), vec![d(b'3'), 256, d(b'3')]);
    assert_eq!(encode("default", "3123"), vec![d(b'3'), 256, d(b'3')]);
    // qwen2 and smollm: every digit alone, so no merge applies.
    let singles: Vec<u32> = b"3123".iter().map(|&b| d(b)).collect();
    assert_eq!(encode("qwen2", "3123"), singles);
    assert_eq!(encode("smollm", "3123"), singles);
}

#[test]
fn llama3_takes_whole_words_from_the_vocabulary() {
    // "hello" is a token but no merges lead to it: Llama 3 (ignore_merges)
    // finds the word whole, GPT-2 spells it in bytes.
    let hello = 256;
    let llama3 = Tokenizer::from_spec(bpe_spec("llama-bpe", &["hello"], &[])).unwrap();
    assert_eq!(llama3.encode("hello", false).unwrap(), vec![hello]);
    let gpt2 = Tokenizer::from_spec(bpe_spec("gpt2", &["hello"], &[])).unwrap();
    let bytes: Vec<u32> = b"hello".iter().map(|&b| b as u32).collect();
    assert_eq!(gpt2.encode("hello", false).unwrap(), bytes);
    // Llama 3 adds BOS by default, GPT-2 style vocabularies do not.
    assert!(llama3.add_bos());
    assert!(!gpt2.add_bos());
}

#[test]
fn special_tokens_are_cut_out_longest_first() {
    let mut spec = bpe_spec("gpt2", &["<x>", "<x><y>", "<u>"], &[]);
    let n = spec.tokens.len();
    let mut types = vec![TokenType::Normal; n];
    types[256] = TokenType::Control;
    types[257] = TokenType::Control;
    types[258] = TokenType::UserDefined;
    spec.token_types = types;
    let tok = Tokenizer::from_spec(spec).unwrap();
    let a = b'a' as u32;
    assert_eq!(
        tok.encode("a<x><y>a<x>", true).unwrap(),
        vec![a, 257, a, 256]
    );
    // Without `special`, control tokens are text but user-defined ones are
    // still matched (as llama.cpp and HF do).
    let plain = tok.encode("<x><u>", false).unwrap();
    let mut want: Vec<u32> = b"<x>".iter().map(|&b| b as u32).collect();
    want.push(258);
    assert_eq!(plain, want);
    // Control tokens are hidden by skip_special; user-defined ones are not.
    assert_eq!(tok.decode(&[a, 257, 258], true), "a<u>");
    assert_eq!(tok.decode(&[a, 257, 258], false), "a<x><y><u>");
}

// ---------------------------------------------------------------------------
// SentencePiece on hand-made vocabularies

/// `<unk>`, `<s>`, `</s>`, the 256 byte tokens (ids 3..=258), then `pieces`
/// with their scores from id 259 on.
fn spm_spec(pieces: &[(&str, f32)], byte_tokens: bool) -> TokenizerSpec {
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
    let mut scores = vec![0.0, 0.0, 0.0];
    if byte_tokens {
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
    }
    for (text, score) in pieces {
        tokens.push(text.to_string());
        types.push(TokenType::Normal);
        scores.push(*score);
    }
    TokenizerSpec {
        model: "llama".into(),
        tokens,
        token_types: types,
        scores,
        ..TokenizerSpec::default()
    }
}

/// Encodes and names the pieces, for readable assertions.
fn spm_pieces(tok: &Tokenizer, text: &str) -> Vec<String> {
    tok.encode(text, true)
        .unwrap()
        .into_iter()
        .map(|id| tok.token_text(id).unwrap().to_string())
        .collect()
}

#[test]
fn spm_merges_the_highest_score_first() {
    // "abc" is encoded as "▁abc": symbols ▁ a b c.
    let vocab = |ab: f32, bc: f32| {
        Tokenizer::from_spec(spm_spec(
            &[
                ("▁", -1.0),
                ("a", -1.0),
                ("b", -1.0),
                ("c", -1.0),
                ("ab", ab),
                ("bc", bc),
                ("▁a", -3.0),
            ],
            true,
        ))
        .unwrap()
    };
    // bc (-0.5) beats ab (-2) and ▁a (-3): ▁ a bc, then ▁a: [▁a, bc].
    assert_eq!(spm_pieces(&vocab(-2.0, -0.5), "abc"), ["▁a", "bc"]);
    // ab (-0.5) first: ▁ ab c; neither ▁ab nor abc is a token: [▁, ab, c].
    assert_eq!(spm_pieces(&vocab(-0.5, -2.0), "abc"), ["▁", "ab", "c"]);
}

#[test]
fn spm_equal_scores_merge_leftmost_first() {
    let tok = Tokenizer::from_spec(spm_spec(
        &[
            ("▁", -1.0),
            ("a", -1.0),
            ("x", -1.0),
            ("y", -1.0),
            ("z", -1.0),
            ("aa", -1.0),
            ("xy", -2.0),
            ("yz", -2.0),
        ],
        true,
    ))
    .unwrap();
    // ▁ a a a: the pairs at 1 and 2 tie; the left one merges: [▁, aa, a].
    assert_eq!(spm_pieces(&tok, "aaa"), ["▁", "aa", "a"]);
    // Different pieces with equal scores: xy is left of yz.
    assert_eq!(spm_pieces(&tok, "xyz"), ["▁", "xy", "z"]);
}

#[test]
fn spm_falls_back_to_bytes_and_decodes_them() {
    let tok = Tokenizer::from_spec(spm_spec(
        &[("▁", -1.0), ("c", -1.0), ("a", -1.0), ("f", -1.0)],
        true,
    ))
    .unwrap();
    // é is not in the vocabulary: its UTF-8 bytes C3 A9 as byte tokens.
    assert_eq!(spm_pieces(&tok, "é"), ["▁", "<0xC3>", "<0xA9>"]);
    assert_eq!(
        spm_pieces(&tok, "café"),
        ["▁", "c", "a", "f", "<0xC3>", "<0xA9>"]
    );
    let ids = tok.encode("café", false).unwrap();
    // decode drops the space the prefix added.
    assert_eq!(tok.decode(&ids, false), "café");
    assert_eq!(tok.token_bytes(3 + 0xC3), &[0xC3]);
}

#[test]
fn spm_space_prefix_and_spaces() {
    let pieces = [
        ("▁", -1.0),
        ("a", -1.0),
        ("b", -1.0),
        ("▁a", -0.5),
        ("▁b", -0.5),
    ];
    let tok = Tokenizer::from_spec(spm_spec(&pieces, true)).unwrap();
    assert!(tok.add_space_prefix() && tok.add_bos());
    assert_eq!(spm_pieces(&tok, "a b"), ["▁a", "▁b"]);
    assert_eq!(spm_pieces(&tok, " a"), ["▁", "▁a"]);
    // After a special token the text gets a space prefix again.
    assert_eq!(spm_pieces(&tok, "a<s>b"), ["▁a", "<s>", "▁b"]);
    // Without add_space_prefix there is none.
    let mut spec = spm_spec(&pieces, true);
    spec.add_space_prefix = Some(false);
    let bare = Tokenizer::from_spec(spec).unwrap();
    assert_eq!(spm_pieces(&bare, "a b"), ["a", "▁b"]);
    assert_eq!(
        bare.decode(&bare.encode("a b", false).unwrap(), false),
        "a b"
    );

    // encode_prompt puts BOS (id 1) in front, once.
    let ids = tok.encode_prompt("a").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.encode_prompt("<s>a").unwrap(), ids);
    // llama.cpp's detokenize: the leading space goes, except after a BOS
    // that skip_special removes.
    assert_eq!(tok.decode(&ids[1..], true), "a");
    assert_eq!(tok.decode(&ids, false), "<s> a");
    assert_eq!(tok.decode(&ids, true), " a");
}

#[test]
fn spm_unknown_pieces() {
    // No byte tokens: a character outside the vocabulary is <unk>.
    let tok = Tokenizer::from_spec(spm_spec(&[("▁", -1.0), ("a", -1.0)], false)).unwrap();
    assert_eq!(spm_pieces(&tok, "aéa"), ["▁", "a", "<unk>", "a"]);
    // <unk> is hidden by skip_special.
    let ids = tok.encode("aé", false).unwrap();
    assert_eq!(tok.decode(&ids, true), "a");
    assert_eq!(tok.decode(&ids, false), "a<unk>");
    // llama.cpp's default <unk> id for SentencePiece is 0.
    assert_eq!(tok.unk(), Some(0));
}

#[test]
fn spm_from_gguf_metadata_matches_the_spec() {
    let spec = spm_spec(
        &[
            ("▁", -1.0),
            ("a", -1.0),
            ("b", -1.0),
            ("ab", -0.5),
            ("▁ab", -0.2),
        ],
        true,
    );
    let types = spec
        .token_types
        .iter()
        .map(|t| match t {
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::Byte => 6,
            _ => 0,
        })
        .collect();
    let meta = metadata(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(spec.tokens.clone())),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(Array::F32(spec.scores.clone())),
        ),
        ("tokenizer.ggml.token_type", Value::Array(Array::I32(types))),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]);
    let from_gguf = Tokenizer::from_gguf(&meta).unwrap();
    let from_spec = Tokenizer::from_spec(spec).unwrap();
    for text in ["ab", "a b", "bab é", ""] {
        assert_eq!(
            from_gguf.encode(text, true).unwrap(),
            from_spec.encode(text, true).unwrap()
        );
    }
    // ▁ a b → ab (-0.5) → ▁ab (-0.2).
    assert_eq!(spm_pieces(&from_gguf, "ab"), ["▁ab"]);
    assert_eq!(from_gguf.kind(), TokenizerKind::Spm);

    // Integer scores are accepted, as llama.cpp does.
    let meta = metadata(vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            strings(&["<unk>", "<s>", "</s>", "▁", "a"]),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(Array::I32(vec![0, 0, 0, -1, -1])),
        ),
    ]);
    assert!(Tokenizer::from_gguf(&meta).is_ok());
}

#[test]
fn spm_rejects_bad_scores() {
    let mut spec = spm_spec(&[("a", -1.0)], false);
    spec.scores.pop();
    let msg = Tokenizer::from_spec(spec).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.ggml.scores"), "{msg}");
    let spec = spm_spec(&[("a", f32::NAN)], false);
    let msg = Tokenizer::from_spec(spec).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer.ggml.scores") && msg.contains("NaN"),
        "{msg}"
    );
}
