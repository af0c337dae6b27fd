//! What ring nodes say to each other (DESIGN.md §7): small postcard
//! control messages, and after a [`Hop`] that carries activations, or a
//! [`Sampled`] that carries logits, one tensor frame whose fixed header
//! repeats the epoch, the micro-batch (as its request id) and the window,
//! and whose dims give the shape: `[tokens, n_embd]` or `[rows, n_vocab]`.
//!
//! A message and its tensor are written together by the one task that
//! sends on a link, so nothing comes between them on the stream.

use serde::{Deserialize, Serialize};

use crate::net::frame::{self, FrameError, TensorHeader, MAX_DIMS};

/// One token of a micro-batch, as it travels between windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMeta {
    /// The request (sequence) it belongs to.
    pub request: u64,
    /// Its position in the sequence.
    pub pos: u32,
    /// The token id: used by the first window, which embeds it.
    pub id: u32,
    /// The last window samples the next token from this one's logits.
    pub want: bool,
    /// The request wants its logits back (tests compare their bits).
    pub logits: bool,
}

/// How the last window samples a request's tokens, when not greedily: the
/// parameters, and how many tokens the request produced before this
/// submission, so that a request resumed on a new plan draws what it would
/// have drawn (`Sampler::resume_at`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TailSampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub drawn: u64,
}

/// A micro-batch for window `window`: token ids for the first window,
/// else `tokens.len() × n_embd` activations in the tensor frame that
/// follows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hop {
    pub epoch: u64,
    pub micro_batch: u64,
    /// The step it belongs to (0: none). The head numbers steps from 1;
    /// every sequence in the ring has one micro-batch in each step, and a
    /// node runs a window once per step for all of that step's
    /// micro-batches, streaming its units once.
    pub step: u64,
    /// The requests whose prompts start in this step (every micro-batch of
    /// the step names them all), so that a node knows which to wait for.
    pub fresh: Vec<u64>,
    /// The prompt length of each request of `fresh`, in order: the KV a
    /// node's caches grow by in this step, so that it can make room
    /// before the step's first micro-batch runs (`super::kvpressure`).
    pub fresh_tokens: Vec<u32>,
    pub window: u16,
    pub tokens: Vec<TokenMeta>,
    pub hidden: bool,
    /// Requests whose last prompt token is in this hop and that are not
    /// sampled greedily, with how to sample them.
    pub sampling: Vec<(u64, TailSampling)>,
}

/// A token sampled by the last window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pick {
    pub request: u64,
    /// Position of the token whose logits were sampled.
    pub pos: u32,
    pub token: u32,
    /// This pick's logits row is in the tensor frame that follows.
    pub logits: bool,
}

/// The tokens one micro-batch produced, for the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sampled {
    pub epoch: u64,
    pub micro_batch: u64,
    pub picks: Vec<Pick>,
}

impl Sampled {
    /// Rows of logits that follow.
    pub fn logits_rows(&self) -> usize {
        self.picks.iter().filter(|p| p.logits).count()
    }
}

/// A control message between ring nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Msg {
    Hop(Hop),
    Sampled(Sampled),
    /// Requests that ended (done or failed): drop their caches.
    Release {
        epoch: u64,
        requests: Vec<u64>,
    },
    /// Requests that failed at a window, for the head.
    Failed {
        epoch: u64,
        requests: Vec<u64>,
        reason: String,
    },
    /// What the sender can hold (`super::kvpressure`), sent to the head
    /// when its ring starts, for admission.
    Capacity {
        epoch: u64,
        kv_positions: u64,
    },
}

/// The header of the tensor frame that follows a message.
pub fn tensor_header(
    epoch: u64,
    micro_batch: u64,
    window: u16,
    rows: usize,
    cols: usize,
) -> TensorHeader {
    let mut dims = [0u32; MAX_DIMS];
    dims[0] = rows as u32;
    dims[1] = cols as u32;
    TensorHeader {
        epoch,
        request: micro_batch,
        position: 0,
        window,
        dims,
        ndims: 2,
    }
}

/// Checks that a tensor frame's header belongs to the message before it
/// and has the shape `[rows, cols]`.
pub fn check_follows(
    h: &TensorHeader,
    epoch: u64,
    micro_batch: u64,
    window: u16,
    rows: usize,
    cols: usize,
) -> Result<(), String> {
    if h.epoch != epoch || h.request != micro_batch || h.window != window {
        return Err(format!(
            "tensor of epoch {} micro-batch {} window {} after a message of epoch {epoch} \
             micro-batch {micro_batch} window {window}",
            h.epoch, h.request, h.window
        ));
    }
    let want = [rows as u64, cols as u64];
    let got: Vec<u64> = h.dims[..h.ndims as usize]
        .iter()
        .map(|&d| d as u64)
        .collect();
    if got != want {
        return Err(format!("activations of shape {got:?}, expected {want:?}"));
    }
    Ok(())
}

/// A message, then its tensor when there is one, as one buffer.
pub fn encode(msg: &Msg, tensor: Option<(&TensorHeader, &[f32])>) -> Result<Vec<u8>, FrameError> {
    let mut out = frame::encode_control(msg)?;
    if let Some((h, data)) = tensor {
        frame::encode_tensor_into(h, data, &mut out)?;
    }
    Ok(out)
}
