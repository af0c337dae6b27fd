//! Reading the fixtures' chat prompts back into messages.

use loip::model::chat::{ChatMessage, Role};

/// The messages behind a ChatML prompt that ends with the generation prompt.
pub fn parse_chatml(prompt: &str) -> Vec<ChatMessage> {
    let body = prompt
        .strip_suffix("<|im_start|>assistant\n")
        .expect("the prompt ends with the generation prompt");
    body.split_terminator("<|im_end|>\n")
        .map(|turn| {
            let turn = turn.strip_prefix("<|im_start|>").expect("a turn opens");
            let (role, content) = turn.split_once('\n').expect("role, newline, content");
            let role = match role {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => panic!("unexpected role {other}"),
            };
            ChatMessage::new(role, content)
        })
        .collect()
}
