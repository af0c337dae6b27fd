//! Chat templates: SmolLM2's own template and ChatML against the prompts in
//! `fixtures/smollm2/greedy.jsonl`, errors, and the Jinja features chat
//! templates rely on.

mod common;

use loip::model::chat::{ChatError, ChatMessage, ChatTemplate, Role, CHATML_TEMPLATE};
use loip::model::gguf::{Gguf, GgufWriter, Value};
use loip::model::tokenizer::Tokenizer;
use serde_json::Value as Json;

/// The real SmolLM2 model; a missing file fails the test.
fn smollm2() -> Gguf {
    let path = common::smollm2();
    Gguf::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// The greedy fixture's chats: (prompt, prompt ids).
fn greedy_prompts() -> Vec<(String, Vec<u32>)> {
    let path = common::fixtures_dir().join("smollm2/greedy.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let v: Json = serde_json::from_str(line).unwrap();
            let ids = v["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (v["prompt"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// What SmolLM2's template puts first when a chat has no system message.
const SMOLLM2_DEFAULT_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn smollm2_template_renders_the_fixture_chats() {
    let gguf = smollm2();
    let tokenizer = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    let template = ChatTemplate::from_gguf(gguf.metadata(), &tokenizer).unwrap();
    assert!(
        template.source().contains("SmolLM"),
        "the model's own template"
    );
    let prompts = greedy_prompts();
    assert!(prompts.len() >= 5);
    let mut with_system = 0;
    for (prompt, _) in &prompts {
        let messages = common::chat::parse_chatml(prompt);
        let rendered = template.render(&messages, true).unwrap();
        if messages[0].role == Role::System {
            with_system += 1;
            assert_eq!(&rendered, prompt);
        } else {
            // The fixture prompts are llama.cpp's built-in ChatML, which
            // does not insert SmolLM2's default system message; the model's
            // own template does.
            assert_eq!(rendered, format!("{SMOLLM2_DEFAULT_SYSTEM}{prompt}"));
        }
    }
    assert!(with_system >= 1, "the fixtures include a system message");
}

#[test]
fn chatml_renders_and_encodes_the_fixture_prompts_exactly() {
    let gguf = smollm2();
    let tokenizer = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    let chatml = ChatTemplate::chatml("<|im_start|>", "<|im_end|>").unwrap();
    for (prompt, prompt_ids) in greedy_prompts() {
        let messages = common::chat::parse_chatml(&prompt);
        let rendered = chatml.render(&messages, true).unwrap();
        assert_eq!(rendered, prompt);
        assert_eq!(tokenizer.encode(&rendered, true).unwrap(), prompt_ids);
        assert_eq!(tokenizer.encode_prompt(&rendered).unwrap(), prompt_ids);
    }
}

#[test]
fn template_variables_come_from_the_tokenizer() {
    let gguf = smollm2();
    let tokenizer = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    let mut w = GgufWriter::new();
    w.add_kv(
        "tokenizer.chat_template",
        Value::String(
            "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ messages | length }}"
                .into(),
        ),
    );
    let meta = Gguf::from_bytes(w.to_bytes().unwrap()).unwrap();
    let template = ChatTemplate::from_gguf(meta.metadata(), &tokenizer).unwrap();
    let chat = [ChatMessage::new(Role::User, "hi")];
    // Booleans print as Python's, like jinja2 does.
    assert_eq!(
        template.render(&chat, false).unwrap(),
        "<|im_start|>|<|im_end|>|False|1"
    );
}

#[test]
fn a_model_without_a_template_gets_chatml() {
    let gguf = smollm2();
    let tokenizer = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    let empty = Gguf::from_bytes(GgufWriter::new().to_bytes().unwrap()).unwrap();
    let template = ChatTemplate::from_gguf(empty.metadata(), &tokenizer).unwrap();
    assert_eq!(template.source(), CHATML_TEMPLATE);
    let chat = [
        ChatMessage::new(Role::System, "Be brief."),
        ChatMessage::new(Role::User, "Hi"),
        ChatMessage::new(Role::Assistant, "Hello."),
        ChatMessage::new(Role::User, "Bye"),
    ];
    assert_eq!(
        template.render(&chat, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(
        template.render(&chat[..2], false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn a_template_of_the_wrong_type_names_the_key() {
    let gguf = smollm2();
    let tokenizer = Tokenizer::from_gguf(gguf.metadata()).unwrap();
    let mut w = GgufWriter::new();
    w.add_kv("tokenizer.chat_template", Value::U32(7));
    let meta = Gguf::from_bytes(w.to_bytes().unwrap()).unwrap();
    let err = ChatTemplate::from_gguf(meta.metadata(), &tokenizer).unwrap_err();
    assert!(matches!(err, ChatError::Metadata(_)), "{err:?}");
    assert!(err.to_string().contains("tokenizer.chat_template"), "{err}");
}

#[test]
fn raise_exception_fails_the_render_with_its_message() {
    let template = ChatTemplate::new(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
         {{ raise_exception('Conversation roles must alternate user/assistant') }}\
         {% endif %}{{ m['content'] }}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let good = [
        ChatMessage::new(Role::User, "a"),
        ChatMessage::new(Role::Assistant, "b"),
    ];
    assert_eq!(template.render(&good, false).unwrap(), "ab");
    let bad = [
        ChatMessage::new(Role::User, "a"),
        ChatMessage::new(Role::User, "b"),
    ];
    let err = template.render(&bad, false).unwrap_err();
    assert!(matches!(err, ChatError::Render(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("Conversation roles must alternate user/assistant"),
        "{err}"
    );
}

#[test]
fn template_errors_carry_minijinja_messages() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "").unwrap_err();
    let ChatError::Compile(inner) = &err else {
        panic!("expected a compile error, got {err:?}");
    };
    assert!(err.to_string().contains(&inner.to_string()), "{err}");
    assert!(err.to_string().contains("syntax error"), "{err}");

    let template = ChatTemplate::new("{{ messages[0].content | no_such_filter }}", "", "");
    let err = match template {
        Err(e) => e,
        Ok(t) => t
            .render(&[ChatMessage::new(Role::User, "x")], false)
            .unwrap_err(),
    };
    assert!(err.to_string().contains("no_such_filter"), "{err}");
}

#[test]
fn hf_template_features_work() {
    // trim_blocks and lstrip_blocks are on, as in transformers; Python's
    // jinja2 renders this template to the same text.
    let template = ChatTemplate::new(
        "{% for m in messages %}\n    {% if m.role == 'system' %}\n{% continue %}\n    {% endif %}\n[{{ m.content.strip() | upper }}]\n{% if loop.index >= 3 %}{% break %}{% endif %}\n{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let chat = [
        ChatMessage::new(Role::System, "sys"),
        ChatMessage::new(Role::User, "  one "),
        ChatMessage::new(Role::Assistant, "two"),
        ChatMessage::new(Role::User, "three"),
    ];
    assert_eq!(template.render(&chat, false).unwrap(), "[ONE]\n[TWO]\n");

    // namespace(), tojson and dict access, which Llama 3 style templates use.
    let template = ChatTemplate::new(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}\
         {{ ns.n }} {{ messages[0] | tojson }} {{ messages[0]['role'] }}",
        "",
        "",
    )
    .unwrap();
    let out = template
        .render(&[ChatMessage::new(Role::User, "a\"b")], false)
        .unwrap();
    assert!(out.starts_with("1 {"), "{out}");
    assert!(
        out.contains(r#""content":"a\"b""#) || out.contains(r#""content": "a\"b""#),
        "{out}"
    );
    assert!(out.ends_with(" user"), "{out}");
}

#[test]
fn roles_serialize_in_lowercase_and_unknown_roles_are_rejected() {
    let m = ChatMessage::new(Role::Assistant, "hi");
    assert_eq!(
        serde_json::to_string(&m).unwrap(),
        r#"{"role":"assistant","content":"hi"}"#
    );
    let parsed: Vec<ChatMessage> = serde_json::from_str(
        r#"[{"role":"system","content":"s"},{"role":"user","content":"u"},{"role":"assistant","content":"a"}]"#,
    )
    .unwrap();
    assert_eq!(
        parsed.iter().map(|m| m.role).collect::<Vec<_>>(),
        [Role::System, Role::User, Role::Assistant]
    );
    for bad in [
        r#"{"role":"tool","content":"x"}"#,
        r#"{"role":"User","content":"x"}"#,
        r#"{"role":"user"}"#,
    ] {
        assert!(serde_json::from_str::<ChatMessage>(bad).is_err(), "{bad}");
    }
}

#[test]
fn runaway_templates_are_stopped() {
    // A hostile template: far more work than any chat needs.
    let template = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "",
        "",
    )
    .unwrap();
    let err = template.render(&[], false).unwrap_err();
    assert!(matches!(err, ChatError::Render(_)), "{err:?}");
}
