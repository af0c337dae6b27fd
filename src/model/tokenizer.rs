//! The tokenizer stored in a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! Two vocabulary kinds, with llama.cpp's behaviour as the reference:
//!
//! - `gpt2`: byte-level BPE. Text is split by the pre-tokenizer that
//!   `tokenizer.ggml.pre` names, each piece is mapped byte by byte onto
//!   GPT-2's printable alphabet, and merges are applied by rank. This part runs
//!   on the `tokenizers` crate.
//! - `llama`: SentencePiece BPE. Spaces become `▁`, a space is put in front of
//!   the text (`add_space_prefix`), adjacent pieces are merged highest score
//!   first, and characters outside the vocabulary fall back to `<0xXX>` byte
//!   tokens. This part is written here, see [`Tokenizer::encode`].
//!
//! In both, special tokens (control, user-defined) are cut out of the text
//! first, longest first, and never split.
//!
//! The tokenizer is built from a plain [`TokenizerSpec`]; [`Tokenizer::from_gguf`]
//! fills one from GGUF metadata.

use std::collections::{BinaryHeap, HashMap};
use std::fmt;

use thiserror::Error;
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{ModelWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::model::gguf::{GgufError, Metadata, OptionalKey};

/// The metadata key naming the vocabulary kind: present in every model that
/// has a tokenizer.
pub const TOKENIZER_MODEL_KEY: &str = "tokenizer.ggml.model";

/// Errors from building a tokenizer or encoding text.
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// The metadata has no tokenizer (or lacks a required part of it).
    #[error("the model has no tokenizer: metadata key `{0}` is missing")]
    MissingKey(&'static str),
    /// `tokenizer.ggml.model` names a vocabulary kind we do not implement.
    #[error("unsupported tokenizer model `{0}` (tokenizer.ggml.model); supported: gpt2, llama")]
    UnknownModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer we do not implement.
    #[error(
        "unsupported pre-tokenizer `{0}` (tokenizer.ggml.pre); supported: default, gpt2, \
         gpt-2, llama-bpe, llama3, llama-v3, qwen2, deepseek-r1-qwen, smollm"
    )]
    UnknownPreTokenizer(String),
    /// A metadata value has the wrong type (the message names the key).
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    /// A metadata value has the right type but is not usable.
    #[error("metadata key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// Bytes handed to [`Tokenizer::encode_bytes`] are not UTF-8.
    #[error("input is not valid UTF-8: {0}")]
    InvalidUtf8(#[from] std::str::Utf8Error),
    /// A character has no token, no byte tokens and the vocabulary no `<unk>`.
    #[error("cannot encode {0:?}: it is not in the vocabulary, which has neither byte tokens for it nor <unk>")]
    Unencodable(char),
    /// The byte-level BPE backend failed.
    #[error("BPE tokenizer: {0}")]
    Bpe(String),
}

/// The type GGUF stores per token in `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 0 or any value outside 1..=6.
    Undefined,
    /// 1: ordinary text.
    Normal,
    /// 2: `<unk>`.
    Unknown,
    /// 3: BOS, EOS, chat markers and the like; parsed only with `special`.
    Control,
    /// 4: added by the model's authors; always parsed as a whole.
    UserDefined,
    /// 5: reserved, never produced and decoded as nothing.
    Unused,
    /// 6: a raw byte, `<0xXX>`.
    Byte,
}

impl TokenType {
    /// The type for a value of `tokenizer.ggml.token_type`.
    pub fn from_gguf(value: i32) -> TokenType {
        match value {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// The vocabulary kind, from `tokenizer.ggml.model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// `gpt2`: byte-level BPE with merges.
    Bpe,
    /// `llama`: SentencePiece BPE with scores and byte fallback.
    Spm,
}

impl TokenizerKind {
    /// The kind for a `tokenizer.ggml.model` value.
    pub fn from_name(name: &str) -> Option<TokenizerKind> {
        match name {
            "gpt2" => Some(TokenizerKind::Bpe),
            "llama" => Some(TokenizerKind::Spm),
            _ => None,
        }
    }
}

/// How byte-level BPE splits text into words before merging, after
/// `tokenizer.ggml.pre`. Each has llama.cpp's regexes, applied in order: each
/// regex splits every piece further, keeping both matches and the text
/// between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `default` (also when the key is missing): punctuation runs, the GPT-2
    /// regex, digit runs, then groups of three ASCII digits.
    Default,
    /// `gpt2`, `gpt-2`: the GPT-2 regex alone; digit runs stay whole.
    Gpt2,
    /// `llama-bpe`, `llama3`, `llama-v3`: Llama 3's regex, digits in groups of
    /// up to three; whole words found in the vocabulary skip the merges.
    Llama3,
    /// `qwen2`, `deepseek-r1-qwen`: Llama 3's regex with single digits.
    Qwen2,
    /// `smollm`: every digit on its own, then the GPT-2 regex.
    Smollm,
}

/// GPT-2's word regex, as llama.cpp writes it (without GPT-2's trailing
/// `|\s+`: text no alternative matches becomes a piece of its own anyway).
const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's regex with the case-insensitive contractions spelled out.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's regex: Llama 3's with one digit per piece.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// The pre-tokenizer for a `tokenizer.ggml.pre` value.
    pub fn from_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "default" => Some(PreTokenizer::Default),
            "gpt2" | "gpt-2" => Some(PreTokenizer::Gpt2),
            "llama-bpe" | "llama3" | "llama-v3" => Some(PreTokenizer::Llama3),
            "qwen2" | "deepseek-r1-qwen" => Some(PreTokenizer::Qwen2),
            "smollm" => Some(PreTokenizer::Smollm),
            _ => None,
        }
    }

    /// The regexes, applied in order.
    pub fn regexes(self) -> &'static [&'static str] {
        match self {
            PreTokenizer::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            PreTokenizer::Gpt2 => &[GPT2_REGEX],
            PreTokenizer::Llama3 => &[LLAMA3_REGEX],
            PreTokenizer::Qwen2 => &[QWEN2_REGEX],
            PreTokenizer::Smollm => &[r"\p{N}", GPT2_REGEX],
        }
    }

    /// Whether a word that is itself a token skips the merges (Llama 3).
    fn ignore_merges(self) -> bool {
        self == PreTokenizer::Llama3
    }

    /// Whether decoding cleans up spaces before punctuation
    /// (`clean_up_tokenization_spaces`), as llama.cpp does for this name.
    fn clean_spaces(self) -> bool {
        !matches!(self, PreTokenizer::Qwen2 | PreTokenizer::Smollm)
    }

    /// Whether BOS is added to a prompt when the file does not say.
    fn default_add_bos(self) -> bool {
        self == PreTokenizer::Llama3
    }
}

/// Everything a [`Tokenizer`] is built from: the GGUF `tokenizer.ggml.*`
/// values, unparsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: String,
    /// `tokenizer.ggml.pre`; `None` means `default`. Only used by `gpt2`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`; empty means every token is normal.
    pub token_types: Vec<TokenType>,
    /// `tokenizer.ggml.scores`; empty means every score is 0. Used by `llama`.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.merges` ("left right", highest priority first). Used
    /// by `gpt2`.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`; `llama` defaults to 1.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`; `llama` defaults to 2.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn).
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (end of message).
    pub eom: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`; `llama` defaults to 0.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`; default true for `llama` and for the
    /// Llama 3 pre-tokenizer, false otherwise.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`; default false.
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`; default true for `llama`, false for
    /// `gpt2`.
    pub add_space_prefix: Option<bool>,
}

impl TokenizerSpec {
    /// Reads the spec from GGUF metadata. Only the presence and types of the
    /// values are checked here; [`Tokenizer::from_spec`] checks the rest.
    pub fn from_gguf(meta: &Metadata) -> Result<TokenizerSpec, TokenizerError> {
        const MODEL: &str = TOKENIZER_MODEL_KEY;
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const MERGES: &str = "tokenizer.ggml.merges";
        const SCORES: &str = "tokenizer.ggml.scores";
        let model = match meta.get_str(MODEL).optional()? {
            Some(model) => model.to_string(),
            None => return Err(TokenizerError::MissingKey(MODEL)),
        };
        let kind = TokenizerKind::from_name(&model)
            .ok_or_else(|| TokenizerError::UnknownModel(clip(&model)))?;
        let tokens = match meta.get_str_array(TOKENS).optional()? {
            Some(tokens) => tokens.to_vec(),
            None => return Err(TokenizerError::MissingKey(TOKENS)),
        };
        let merges = match (kind, meta.get_str_array(MERGES).optional()?) {
            (_, Some(merges)) => merges.to_vec(),
            (TokenizerKind::Bpe, None) => return Err(TokenizerError::MissingKey(MERGES)),
            (TokenizerKind::Spm, None) => Vec::new(),
        };
        // llama.cpp also takes integer scores.
        let scores = match meta.get_f32_array(SCORES).optional() {
            Ok(scores) => scores.map(<[f32]>::to_vec).unwrap_or_default(),
            Err(e) => match meta.get_i32_array(SCORES) {
                Ok(ints) => ints.iter().map(|&i| i as f32).collect(),
                Err(_) => return Err(e.into()),
            },
        };
        let token_types = meta
            .get_i32_array("tokenizer.ggml.token_type")
            .optional()?
            .map(|types| types.iter().map(|&t| TokenType::from_gguf(t)).collect())
            .unwrap_or_default();
        let id = |key: &str| meta.get_u32(key).optional();
        let flag = |key: &str| meta.get_bool(key).optional();
        Ok(TokenizerSpec {
            model,
            pre: meta
                .get_str("tokenizer.ggml.pre")
                .optional()?
                .map(str::to_string),
            tokens,
            token_types,
            scores,
            merges,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token")?,
            add_eos: flag("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix")?,
        })
    }
}

/// Token texts that end a turn or the text, as llama.cpp recognises them
/// when the file marks no such token: they end generation.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

/// The most tokens a vocabulary may have: ids must fit in `u32` and the
/// tables stay within reason.
const MAX_VOCAB: usize = 1 << 24;

/// A tokenizer for one model. Cheap to share behind an `Arc`; every method
/// takes `&self`.
pub struct Tokenizer {
    kind: TokenizerKind,
    pre: Option<PreTokenizer>,
    texts: Vec<String>,
    types: Vec<TokenType>,
    to_id: HashMap<String, u32>,
    /// Each token's bytes as decoded text, special tokens shown:
    /// `pieces[piece_starts[i]..piece_starts[i + 1]]`.
    pieces: Vec<u8>,
    piece_starts: Vec<usize>,
    /// Control, user-defined and unknown tokens, in the order they are cut out
    /// of text: longest text first, then lowest id.
    special_order: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    engine: Engine,
}

enum Engine {
    Bpe(Box<HfTokenizer>),
    Spm(Spm),
}

/// SentencePiece BPE state: the scores and the byte-fallback table.
struct Spm {
    scores: Vec<f32>,
    byte_tokens: Box<[Option<u32>; 256]>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.pre)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// A piece of input after the special tokens are cut out.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl Tokenizer {
    /// Builds the model's tokenizer from its GGUF metadata.
    pub fn from_gguf(meta: &Metadata) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_spec(TokenizerSpec::from_gguf(meta)?)
    }

    /// The model's tokenizer, or `None` when its metadata has no tokenizer
    /// at all (no `tokenizer.ggml.model`). A partial or invalid tokenizer is
    /// an error, as in [`Tokenizer::from_gguf`].
    pub fn from_gguf_if_present(meta: &Metadata) -> Result<Option<Tokenizer>, TokenizerError> {
        if meta.get(TOKENIZER_MODEL_KEY).is_none() {
            return Ok(None);
        }
        Tokenizer::from_gguf(meta).map(Some)
    }

    /// Builds a tokenizer from its spec, checking every part of it.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        let kind = TokenizerKind::from_name(&spec.model)
            .ok_or_else(|| TokenizerError::UnknownModel(clip(&spec.model)))?;
        let n = spec.tokens.len();
        if n == 0 {
            return Err(TokenizerError::Invalid {
                key: "tokenizer.ggml.tokens",
                reason: "the vocabulary is empty".into(),
            });
        }
        if n > MAX_VOCAB {
            return Err(TokenizerError::Invalid {
                key: "tokenizer.ggml.tokens",
                reason: format!("{n} tokens, more than the {MAX_VOCAB} supported"),
            });
        }
        let types = if spec.token_types.is_empty() {
            vec![TokenType::Normal; n]
        } else if spec.token_types.len() == n {
            spec.token_types
        } else {
            return Err(TokenizerError::Invalid {
                key: "tokenizer.ggml.token_type",
                reason: format!(
                    "{} entries for {n} tokens in tokenizer.ggml.tokens",
                    spec.token_types.len()
                ),
            });
        };

        let mut to_id = HashMap::with_capacity(n);
        for (id, text) in spec.tokens.iter().enumerate() {
            // An empty token can never be produced by encoding.
            if text.is_empty() {
                continue;
            }
            if let Some(first) = to_id.insert(text.clone(), id as u32) {
                return Err(TokenizerError::Invalid {
                    key: "tokenizer.ggml.tokens",
                    reason: format!("duplicate token {:?} at ids {first} and {id}", clip(text)),
                });
            }
        }

        let check_id =
            |key: &'static str, id: Option<u32>| -> Result<Option<u32>, TokenizerError> {
                match id {
                    Some(id) if id as usize >= n => Err(TokenizerError::Invalid {
                        key,
                        reason: format!("token id {id} is out of range for {n} tokens"),
                    }),
                    other => Ok(other),
                }
            };
        let (default_bos, default_eos, default_unk) = match kind {
            // llama.cpp's defaults for SentencePiece vocabularies.
            TokenizerKind::Spm => (Some(1), Some(2), Some(0)),
            TokenizerKind::Bpe => (None, None, None),
        };
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let bos = check_id("tokenizer.ggml.bos_token_id", spec.bos)?.or(in_range(default_bos));
        let eos = check_id("tokenizer.ggml.eos_token_id", spec.eos)?.or(in_range(default_eos));
        let eot = check_id("tokenizer.ggml.eot_token_id", spec.eot)?;
        let eom = check_id("tokenizer.ggml.eom_token_id", spec.eom)?;
        let unk = check_id("tokenizer.ggml.unknown_token_id", spec.unk)?.or(in_range(default_unk));

        let pre = match kind {
            TokenizerKind::Bpe => Some(match spec.pre.as_deref() {
                None | Some("") => PreTokenizer::Default,
                Some(name) => PreTokenizer::from_name(name)
                    .ok_or_else(|| TokenizerError::UnknownPreTokenizer(clip(name)))?,
            }),
            TokenizerKind::Spm => None,
        };
        let add_bos = spec.add_bos.unwrap_or(match pre {
            Some(pre) => pre.default_add_bos(),
            None => true,
        });
        let add_eos = spec.add_eos.unwrap_or(false);
        let add_space_prefix = spec.add_space_prefix.unwrap_or(kind == TokenizerKind::Spm);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::Invalid {
                key: "tokenizer.ggml.add_bos_token",
                reason: "true, but tokenizer.ggml.bos_token_id is not set".into(),
            });
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::Invalid {
                key: "tokenizer.ggml.add_eos_token",
                reason: "true, but tokenizer.ggml.eos_token_id is not set".into(),
            });
        }

        // Like llama.cpp: tokens that end generation are control tokens even
        // where the file forgot to say so, so they are parsed and hidden alike.
        let mut types = types;
        let mut eog: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for &text in END_OF_GENERATION_TEXTS {
            if let Some(&id) = to_id.get(text) {
                types[id as usize] = TokenType::Control;
                eog.push(id);
            }
        }
        for id in [eot, eom].into_iter().flatten() {
            types[id as usize] = TokenType::Control;
        }
        eog.sort_unstable();
        eog.dedup();

        let mut special_order: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                matches!(
                    types[id as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                ) && !spec.tokens[id as usize].is_empty()
            })
            .collect();
        special_order.sort_by(|&a, &b| {
            let (ta, tb) = (&spec.tokens[a as usize], &spec.tokens[b as usize]);
            tb.len().cmp(&ta.len()).then(a.cmp(&b))
        });

        let mut pieces = Vec::new();
        let mut piece_starts = Vec::with_capacity(n + 1);
        for (text, &ty) in spec.tokens.iter().zip(&types) {
            piece_starts.push(pieces.len());
            token_piece(kind, text, ty, &mut pieces);
        }
        piece_starts.push(pieces.len());

        let engine = match kind {
            TokenizerKind::Bpe => {
                let pre = pre.unwrap_or(PreTokenizer::Default);
                Engine::Bpe(Box::new(build_bpe(&spec.tokens, &spec.merges, pre)?))
            }
            TokenizerKind::Spm => Engine::Spm(build_spm(&to_id, spec.scores, n)?),
        };

        Ok(Tokenizer {
            kind,
            pre,
            texts: spec.tokens,
            types,
            to_id,
            pieces,
            piece_starts,
            special_order,
            bos,
            eos,
            eot,
            unk,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces: pre.is_some_and(PreTokenizer::clean_spaces),
            engine,
        })
    }

    /// Encodes `text` without adding BOS or EOS. With `special`, control
    /// tokens written in the text (`<|im_start|>`) become those tokens;
    /// without it they are encoded as plain text. User-defined tokens are
    /// matched either way, as llama.cpp and HF tokenizers do.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        let fragments = self.partition(text, special);
        match &self.engine {
            Engine::Bpe(hf) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(text) => {
                            let encoding = hf
                                .encode_fast(text, false)
                                .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
                            out.extend_from_slice(encoding.get_ids());
                        }
                    }
                }
            }
            Engine::Spm(spm) => {
                // As llama.cpp: a space goes in front of the text and after
                // every special token, when `add_space_prefix` is set.
                let mut prev_special = true;
                let mut buf = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(text) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in text.chars() {
                                buf.push(if c == ' ' { '▁' } else { c });
                            }
                            self.spm_encode(spm, &buf, &mut out)?;
                            prev_special = false;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// [`encode`](Self::encode) for bytes that may not be UTF-8 (from the
    /// command line or a file); invalid UTF-8 is an error saying where.
    pub fn encode_bytes(&self, bytes: &[u8], special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode(std::str::from_utf8(bytes)?, special)
    }

    /// Encodes a prompt for generation: special tokens parsed, BOS in front
    /// and EOS at the end where the model's flags say so. A prompt that
    /// already starts with BOS (a chat template that writes `bos_token`) gets
    /// no second one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let body = self.encode(text, true)?;
        let mut out = Vec::with_capacity(body.len() + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            if body.first() != Some(&bos) {
                out.push(bos);
            }
        }
        out.extend_from_slice(&body);
        if let (true, Some(eos)) = (self.add_eos, self.eos) {
            out.push(eos);
        }
        Ok(out)
    }

    /// Decodes ids to text, as llama.cpp's `llama_detokenize`: with
    /// `skip_special`, control and unknown tokens give no text (and a leading
    /// BOS / trailing EOS that the flags add are dropped); for vocabularies
    /// that add a space prefix, one leading space is removed; invalid UTF-8
    /// becomes U+FFFD. Ids outside the vocabulary give no text.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut ids = ids;
        let mut strip_space = self.add_space_prefix;
        if skip_special && self.add_bos && !ids.is_empty() && Some(ids[0]) == self.bos {
            strip_space = false;
            ids = &ids[1..];
        }
        if skip_special && self.add_eos && ids.last().copied() == self.eos && self.eos.is_some() {
            ids = &ids[..ids.len() - 1];
        }
        let mut bytes = Vec::new();
        for &id in ids {
            let mut piece = self.piece(id, skip_special);
            if strip_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
                strip_space = false;
            }
            bytes.extend_from_slice(piece);
        }
        if self.clean_spaces {
            clean_up_spaces(&mut bytes);
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// A token's bytes as text, special tokens shown (`<|im_end|>`). Byte
    /// tokens and byte-level pieces may be part of a UTF-8 character. Empty
    /// for unused tokens and ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let id = id as usize;
        if id >= self.texts.len() {
            return &[];
        }
        &self.pieces[self.piece_starts[id]..self.piece_starts[id + 1]]
    }

    /// A token's bytes as decoding shows them: empty for special tokens when
    /// `skip_special`.
    pub(crate) fn piece(&self, id: u32, skip_special: bool) -> &[u8] {
        if skip_special && self.is_special(id) {
            return &[];
        }
        self.token_bytes(id)
    }

    /// The token's text as stored in the vocabulary (`Ġthe`, `▁the`, `<s>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    /// The token's type.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// The id of the token whose stored text is exactly `text`.
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.to_id.get(text).copied()
    }

    /// Whether the token is control or unknown: the tokens that
    /// `skip_special` leaves out of decoded text.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_type(id),
            Some(TokenType::Control | TokenType::Unknown)
        )
    }

    /// Whether generating this token ends generation: EOS, EOT, EOM, and the
    /// well-known end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, …).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All tokens that end generation, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The vocabulary kind.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// The pre-tokenizer (byte-level BPE only).
    pub fn pre_tokenizer(&self) -> Option<PreTokenizer> {
        self.pre
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token: `tokenizer.ggml.eot_token_id`, else EOS.
    pub fn eot(&self) -> Option<u32> {
        self.eot.or(self.eos)
    }

    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Whether [`encode_prompt`](Self::encode_prompt) puts BOS in front.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode_prompt`](Self::encode_prompt) puts EOS at the end.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether SentencePiece encoding puts a space in front of the text.
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Cuts special tokens out of `text`, as llama.cpp does: for each special
    /// token, longest first, every occurrence in the remaining text becomes
    /// that token. Control and unknown tokens only when `special`.
    fn partition<'a>(&self, text: &'a str, special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = Vec::new();
        if text.is_empty() {
            return fragments;
        }
        fragments.push(Fragment::Text(text));
        let mut next = Vec::new();
        for &id in &self.special_order {
            if !special && self.types[id as usize] != TokenType::UserDefined {
                continue;
            }
            let token = self.texts[id as usize].as_str();
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(token)))
            {
                continue;
            }
            next.clear();
            for fragment in fragments.drain(..) {
                match fragment {
                    Fragment::Text(t) => {
                        let mut rest = t;
                        while let Some(at) = rest.find(token) {
                            if at > 0 {
                                next.push(Fragment::Text(&rest[..at]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[at + token.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    token @ Fragment::Token(_) => next.push(token),
                }
            }
            std::mem::swap(&mut fragments, &mut next);
        }
        fragments
    }

    /// SentencePiece BPE on one fragment (spaces already `▁`), as llama.cpp's
    /// `llm_tokenizer_spm`: start from characters, repeatedly merge the
    /// adjacent pair whose concatenation is a token with the highest score
    /// (leftmost on ties), then emit each piece's token, or its bytes as
    /// `<0xXX>` tokens when the piece is not one.
    ///
    /// Written here rather than with the `tokenizers` crate: its BPE ranks
    /// merges by a pair list, and turning scores into such a list loses the
    /// rule that equal scores merge leftmost first (many GGUF vocabularies
    /// have equal or missing scores), so results could differ from llama.cpp.
    fn spm_encode(&self, spm: &Spm, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        struct Symbol {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        #[derive(PartialEq)]
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            len: usize,
        }
        impl Eq for Bigram {}
        impl Ord for Bigram {
            // Highest score first, then leftmost. Scores are never NaN.
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                self.score
                    .total_cmp(&other.score)
                    .then(other.left.cmp(&self.left))
            }
        }
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }

        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let try_add = |symbols: &[Symbol],
                       queue: &mut BinaryHeap<Bigram>,
                       left: Option<usize>,
                       right: Option<usize>| {
            let (Some(left), Some(right)) = (left, right) else {
                return;
            };
            let start = symbols[left].start;
            let len = symbols[left].len + symbols[right].len;
            if let Some(&id) = self.to_id.get(&text[start..start + len]) {
                queue.push(Bigram {
                    score: spm.scores[id as usize],
                    left,
                    right,
                    len,
                });
            }
        };
        for i in 1..symbols.len() {
            try_add(&symbols, &mut queue, Some(i - 1), Some(i));
        }
        while let Some(bigram) = queue.pop() {
            let (l, r) = (bigram.left, bigram.right);
            // Skip pairs that an earlier merge has changed.
            if symbols[l].len == 0
                || symbols[r].len == 0
                || symbols[l].len + symbols[r].len != bigram.len
            {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            let after = symbols[r].next;
            symbols[l].next = after;
            if let Some(a) = after {
                symbols[a].prev = Some(l);
            }
            let before = symbols[l].prev;
            try_add(&symbols, &mut queue, before, Some(l));
            try_add(&symbols, &mut queue, Some(l), after);
        }

        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let piece = &text[symbols[i].start..symbols[i].start + symbols[i].len];
            if let Some(&id) = self.to_id.get(piece) {
                out.push(id);
            } else {
                // Not merged, so a single character outside the vocabulary.
                for c in piece.chars() {
                    let mut utf8 = [0u8; 4];
                    let bytes = c.encode_utf8(&mut utf8).as_bytes();
                    if bytes.iter().all(|&b| spm.byte_tokens[b as usize].is_some()) {
                        out.extend(bytes.iter().filter_map(|&b| spm.byte_tokens[b as usize]));
                    } else if let Some(unk) = self.unk {
                        out.push(unk);
                    } else {
                        return Err(TokenizerError::Unencodable(c));
                    }
                }
            }
            at = symbols[i].next;
        }
        Ok(())
    }
}

/// Appends the text a token decodes to, special tokens shown, as llama.cpp's
/// `token_to_piece`.
fn token_piece(kind: TokenizerKind, text: &str, ty: TokenType, out: &mut Vec<u8>) {
    match ty {
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
            out.extend_from_slice(text.as_bytes())
        }
        TokenType::Normal => match kind {
            TokenizerKind::Bpe => {
                for c in text.chars() {
                    match byte_level_decode(c) {
                        Some(b) => out.push(b),
                        // Not from the byte alphabet: keep the character
                        // (llama.cpp writes an [UNK_BYTE_…] marker instead).
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
            }
            TokenizerKind::Spm => {
                for c in text.chars() {
                    if c == '▁' {
                        out.push(b' ');
                    } else {
                        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                }
            }
        },
        TokenType::Byte => {
            if let Some(b) = parse_byte_token(text) {
                out.push(b);
            }
        }
        TokenType::Unused | TokenType::Undefined => {}
    }
}

/// At most 64 characters of a string from the file, for error messages: a
/// hostile file may hold a gigabyte-long token.
fn clip(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The byte of a `<0xXX>` token.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-level alphabet: bytes that are printable Latin-1 characters
/// (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves; the other 68 bytes,
/// in increasing order, are written as U+0100, U+0101, ….
fn byte_level_encode(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
    }
}

/// The byte a byte-level character stands for.
fn byte_level_decode(c: char) -> Option<u8> {
    static TABLE: std::sync::OnceLock<HashMap<char, u8>> = std::sync::OnceLock::new();
    TABLE
        .get_or_init(|| (0..=255u8).map(|b| (byte_level_encode(b), b)).collect())
        .get(&c)
        .copied()
}

/// Byte-level BPE: the pre-tokenizer's regexes, the byte-level mapping, then
/// merges by rank, all on the `tokenizers` crate.
fn build_bpe(
    tokens: &[String],
    merges: &[String],
    pre: PreTokenizer,
) -> Result<HfTokenizer, TokenizerError> {
    let vocab: BpeVocab = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.is_empty())
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let mut pairs = Vec::with_capacity(merges.len());
    let mut seen = std::collections::HashSet::with_capacity(merges.len());
    for (rank, merge) in merges.iter().enumerate() {
        // As llama.cpp: split at the first space after the first character.
        let split = merge
            .char_indices()
            .skip(1)
            .find(|&(_, c)| c == ' ')
            .map(|(at, _)| at)
            .ok_or_else(|| TokenizerError::Invalid {
                key: "tokenizer.ggml.merges",
                reason: format!(
                    "merge {rank} ({:?}) is not two tokens separated by a space",
                    clip(merge)
                ),
            })?;
        let (left, right) = (&merge[..split], &merge[split + 1..]);
        for part in [left, right, &format!("{left}{right}")] {
            if !vocab.contains_key(part) {
                return Err(TokenizerError::Invalid {
                    key: "tokenizer.ggml.merges",
                    reason: format!(
                        "merge {rank} ({:?}): {:?} is not in the vocabulary",
                        clip(merge),
                        clip(part)
                    ),
                });
            }
        }
        // A repeated pair keeps its first (highest) rank, as in llama.cpp.
        if seen.insert((left, right)) {
            pairs.push((left.to_string(), right.to_string()));
        }
    }
    let model = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|e| TokenizerError::Bpe(e.to_string()))?;

    let mut steps = Vec::new();
    for regex in pre.regexes() {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Bpe(format!("pre-tokenizer regex {regex:?}: {e}")))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    // Bytes to GPT-2's alphabet only; the splitting is done above.
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));

    let mut hf = HfTokenizer::new(ModelWrapper::BPE(model));
    hf.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
    Ok(hf)
}

fn build_spm(
    to_id: &HashMap<String, u32>,
    scores: Vec<f32>,
    n: usize,
) -> Result<Spm, TokenizerError> {
    let scores = if scores.is_empty() {
        vec![0.0; n]
    } else if scores.len() != n {
        return Err(TokenizerError::Invalid {
            key: "tokenizer.ggml.scores",
            reason: format!(
                "{} scores for {n} tokens in tokenizer.ggml.tokens",
                scores.len()
            ),
        });
    } else if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(TokenizerError::Invalid {
            key: "tokenizer.ggml.scores",
            reason: format!("score {i} is NaN"),
        });
    } else {
        // -0.0 and 0.0 must compare equal when ordering merges.
        scores.into_iter().map(|s| s + 0.0).collect()
    };
    let mut byte_tokens = Box::new([None; 256]);
    for (b, slot) in byte_tokens.iter_mut().enumerate() {
        *slot = to_id.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
            // llama.cpp falls back to a token that is the byte itself.
            let b = b as u8;
            b.is_ascii()
                .then(|| to_id.get(&char::from(b).to_string()).copied())
                .flatten()
        });
    }
    Ok(Spm {
        scores,
        byte_tokens,
    })
}

/// llama.cpp's `clean_up_tokenization_spaces`, on ASCII bytes only so UTF-8
/// stays valid: drops the space in " ?", " !", " .", " ,"; turns " ' " into
/// "'"; drops the space in " 's", " 'm", " 're", " 've".
fn clean_up_spaces(text: &mut Vec<u8>) {
    if text.is_empty() {
        return;
    }
    // Pass 1: a space before ? ! . ,
    let input = std::mem::take(text);
    let mut out = Vec::with_capacity(input.len());
    out.push(input[0]);
    for i in 1..input.len() {
        let x = input[i];
        if input[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            out.pop();
        }
        out.push(x);
    }
    // Pass 2: a lone apostrophe between spaces loses both spaces. The space
    // after it is consumed, so it cannot start another match.
    let mut input = out;
    let mut out = Vec::with_capacity(input.len());
    out.push(input[0]);
    let mut i = 1;
    while i < input.len() {
        let x = input[i];
        if x == b'\'' && i + 1 < input.len() && input[i - 1] == b' ' && input[i + 1] == b' ' {
            out.pop();
            i += 1;
            input[i] = 0;
        }
        out.push(x);
        i += 1;
    }
    // Pass 3: contractions.
    let input = out;
    let mut out = Vec::with_capacity(input.len());
    out.push(input[0]);
    for i in 1..input.len() {
        let x = input[i];
        if input[i - 1] == b' ' && x == b'\'' && i + 1 < input.len() {
            let x1 = input[i + 1];
            let x2 = input.get(i + 2).copied();
            if matches!(x1, b's' | b'm')
                || matches!((x1, x2), (b'r', Some(b'e')) | (b'v', Some(b'e')))
            {
                out.pop();
            }
        }
        out.push(x);
    }
    *text = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_level_encode).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_level_encode(b' '), 'Ġ');
        assert_eq!(byte_level_encode(b'\n'), 'Ċ');
        assert_eq!(byte_level_encode(b'a'), 'a');
        for b in 0..=255u8 {
            assert_eq!(byte_level_decode(byte_level_encode(b)), Some(b));
        }
    }

    #[test]
    fn clean_up_spaces_matches_llama_cpp_rules() {
        let clean = |s: &str| {
            let mut v = s.as_bytes().to_vec();
            clean_up_spaces(&mut v);
            String::from_utf8(v).unwrap()
        };
        assert_eq!(clean("Hello , world !"), "Hello, world!");
        assert_eq!(clean("it ' s"), "it's");
        assert_eq!(
            clean("it 's and they 're and I 'll"),
            "it's and they're and I 'll"
        );
        assert_eq!(clean(" ."), ".");
    }
}
