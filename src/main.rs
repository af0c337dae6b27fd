//! The `loip` command line: parse arguments, call the library, print.
//!
//! Every failure is one line `error: ...` on stderr with exit code 1; clap's
//! usage errors exit with 2.

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use loip::compute::backend::{resolve as resolve_backend, BackendChoice};
use loip::engine::bench::{self, BenchSpec};
use loip::engine::generate::Engine;
use loip::engine::offload::{open_engine, Budget, Demand, LoadMode};
use loip::engine::sampler::{FinishReason, SamplingParams};
use loip::engine::session::ChatSession;
use loip::engine::textgen::{Completion, Request};
use loip::engine::weights::Model;
use loip::model::chat::{ChatMessage, ChatTemplate, Role, TemplateChoice};
use loip::model::gguf::Gguf;
use loip::model::inspect;
use loip::model::synth::SynthSpec;
use loip::model::tokenizer::Tokenizer;
use loip::plan::profile::{self as profiling, ProfileSpec};
use loip::plan::validate::{self, ValidationSpec};
use loip::plan::{
    plan_report, DeviceSource, ModelShape, Objective, Pattern, PlanError, PlanRequest, Planner,
    Workload,
};

#[derive(Parser)]
#[command(
    name = "loip",
    version,
    about = "Lossless LLM inference on a cluster of edge devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarize a model file: architecture, hyper-parameters, tensors.
    Inspect {
        #[command(flatten)]
        model: ModelArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Split text into the model's tokens: one id and its text per line.
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// The text; `-` reads it from standard input.
        #[arg(value_name = "TEXT")]
        text: OsString,
        /// Encode control tokens written in the text (`<|im_start|>`) as
        /// plain text instead of as those tokens.
        #[arg(long)]
        no_special: bool,
        /// Print one JSON object {"ids": [...], "pieces": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Generate from a prompt; stops at an end-of-generation token or after
    /// --max-tokens. Greedy unless --temperature says otherwise.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        prompt: PromptArgs,
        /// A system message before the --chat message.
        #[arg(long, value_name = "TEXT", conflicts_with_all = ["prompt", "prompt_ids"])]
        system: Option<OsString>,
        #[command(flatten)]
        template: TemplateArg,
        /// Most tokens to generate.
        #[arg(long, value_name = "N", default_value_t = 64)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        backend: BackendArg,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Print one JSON object: prompt_ids, tokens, text, finish_reason,
        /// timings.
        #[arg(long)]
        json: bool,
        /// Print the text as it is produced.
        #[arg(long, conflicts_with_all = ["json", "prompt_ids"])]
        stream: bool,
    },
    /// Chat with the model: one message per line on standard input, the
    /// answers streamed. Ctrl-C stops an answer, Ctrl-D ends the chat.
    Chat {
        #[command(flatten)]
        model: ModelArg,
        /// A system message that opens the conversation.
        #[arg(long, value_name = "TEXT")]
        system: Option<OsString>,
        #[command(flatten)]
        template: TemplateArg,
        /// Most tokens per answer (fewer when the context has less room).
        #[arg(long, value_name = "N", default_value_t = 512)]
        max_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        threads: ThreadsArg,
        /// Print one JSON object per answer: prompt, prompt_ids, tokens,
        /// text, finish_reason, timings.
        #[arg(long)]
        json: bool,
    },
    /// Teacher-forced pass: per position the argmax, the five largest logits
    /// and the log-probability of the next id.
    Score {
        #[command(flatten)]
        model: ModelArg,
        /// Token ids, comma-separated.
        #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[command(flatten)]
        threads: ThreadsArg,
        /// Print one JSON object {"positions": [...]}; the last position has
        /// no "logprob_next".
        #[arg(long)]
        json: bool,
    },
    /// Measure prefill and decode speed on deterministic prompts.
    Bench {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        backend: BackendArg,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Prompt length of each sequence.
        #[arg(long, value_name = "N", default_value = "512")]
        prompt_tokens: NonZeroUsize,
        /// Decode steps after the prompt (the end token does not stop them).
        #[arg(long, value_name = "N", default_value = "128")]
        gen_tokens: NonZeroUsize,
        /// Sequences decoded together, one token each per step.
        #[arg(long, value_name = "B", default_value = "1")]
        batch: NonZeroUsize,
        /// Measured runs after the warm-up; the median is reported.
        #[arg(long, value_name = "N", default_value = "3")]
        repeat: NonZeroUsize,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Measure this device on a model (compute, storage, memory), fit the
    /// cost model and store the profile; a stored one is reused until the
    /// model or the hardware changes.
    Profile {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Measure again even when a valid profile is stored.
        #[arg(long)]
        refresh: bool,
        /// Fewer batches, contexts and repetitions: seconds, not a minute.
        #[arg(long)]
        quick: bool,
        /// Memory budget to record: bytes with a unit or a percentage of
        /// the model [default: MemAvailable less a reserve].
        #[arg(long, value_name = "SIZE")]
        mem_budget: Option<String>,
        /// Also write the profile as a device file (profiled form).
        #[arg(long, value_name = "PATH")]
        write_toml: Option<PathBuf>,
        /// Print the stored profile as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Compare the decode step time the simulator predicts for the
    /// offloading engine with the one it takes, at several memory budgets
    /// and batches (profiles this device first).
    Validate {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        threads: ThreadsArg,
        /// Memory budgets in percent of the model, comma-separated.
        #[arg(
            long,
            value_name = "PCTS",
            value_delimiter = ',',
            default_value = "100,50,25"
        )]
        budgets: Vec<f64>,
        /// Decode batches, comma-separated.
        #[arg(long, value_name = "BS", value_delimiter = ',', default_value = "1,16")]
        batches: Vec<NonZeroUsize>,
        /// Streaming slots (K).
        #[arg(long, value_name = "K", default_value = "2")]
        slots: NonZeroUsize,
        /// Prompt length of each sequence.
        #[arg(long, value_name = "N", default_value = "64")]
        prompt_tokens: NonZeroUsize,
        /// Decode steps timed (after 3 warm-up steps); the median counts.
        #[arg(long, value_name = "N", default_value = "9")]
        steps: NonZeroUsize,
        /// A quick profile.
        #[arg(long)]
        quick: bool,
        /// Measure a row outside the 15% tolerance again (three tries at most).
        #[arg(long)]
        retry: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Plan a model over devices: ring order, windows, resident and
    /// streamed layers, and the simulator's prediction.
    Plan {
        /// The GGUF model file to plan.
        #[arg(long, value_name = "PATH", required_unless_present = "model_spec")]
        model: Option<PathBuf>,
        /// A model by name instead of a file: llama3-70b.
        #[arg(long, value_name = "NAME", conflicts_with = "model")]
        model_spec: Option<String>,
        /// Device files (spec or profiled form), comma-separated, in ring
        /// order for the baselines; `self` is this machine's stored profile
        /// (needs --model).
        #[arg(long, value_name = "FILES", value_delimiter = ',', required = true)]
        devices: Vec<String>,
        /// The link between every two devices: BANDWIDTH,LATENCY.
        #[arg(long, value_name = "LINK", default_value = "1gbit,1ms")]
        link: String,
        /// How requests arrive: sporadic or bursty:N.
        #[arg(long, value_name = "PATTERN", default_value = "sporadic")]
        pattern: String,
        /// loip, ring or contiguous.
        #[arg(long, value_name = "NAME", default_value = "loip")]
        planner: String,
        /// latency or throughput [default: latency for sporadic, throughput
        /// for bursty].
        #[arg(long, value_name = "WHAT")]
        objective: Option<String>,
        /// Prompt tokens of each request.
        #[arg(long, value_name = "N", default_value = "128")]
        prompt_tokens: u32,
        /// Tokens generated per request.
        #[arg(long, value_name = "N", default_value = "128")]
        output_tokens: u32,
        /// Context each sequence may reach (the KV cache is planned for it).
        #[arg(long, value_name = "N", default_value = "1024")]
        context_tokens: u32,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a model with random weights in a preset shape.
    Synth {
        /// Where to write the GGUF file.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// The preset shape, e.g. tiny (an unknown name lists them all).
        #[arg(long, value_name = "NAME")]
        preset: String,
    },
    /// Serve the model over HTTP: an OpenAI-compatible API, a web chat page,
    /// /health, /metrics and /v1/cluster.
    Serve {
        #[command(flatten)]
        model: ModelArg,
        /// Address to listen on (all interfaces by default: the LAN).
        #[arg(long, default_value = "0.0.0.0")]
        host: std::net::IpAddr,
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Require `Authorization: Bearer KEY` on every route but /health
        /// and the page.
        #[arg(long, value_name = "KEY", env = "LOIP_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Sequences decoded together at most.
        #[arg(long, value_name = "N", default_value = "8")]
        max_batch: NonZeroUsize,
        /// Requests that may wait for a place in the batch [default: twice
        /// --max-batch]; past it, 429.
        #[arg(long, value_name = "N")]
        queue: Option<usize>,
        /// Tokens a sequence may hold, prompt and answer [default: the
        /// model's context]; the KV cache under --mem-budget is budgeted for
        /// --max-batch sequences of this length.
        #[arg(long, value_name = "N")]
        context: Option<NonZeroUsize>,
        #[command(flatten)]
        template: TemplateArg,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        backend: BackendArg,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Largest request body in bytes; larger is 413.
        #[arg(long, value_name = "BYTES", default_value_t = 2 << 20)]
        max_body: usize,
        /// Seconds a client may take to send a request's headers.
        #[arg(long, value_name = "S", default_value_t = 10.0)]
        header_timeout: f64,
        /// Seconds a streaming client may take none of its output before
        /// it is cut off.
        #[arg(long, value_name = "S", default_value_t = 30.0)]
        stall_timeout: f64,
        /// Do not announce the endpoint over mDNS (_loip-chat._tcp).
        #[arg(long)]
        no_mdns: bool,
        /// Under --mem-budget, reserve the KV cache of --max-batch sequences
        /// of --context tokens up front instead of adapting the resident
        /// set as the caches grow.
        #[arg(long)]
        no_adapt: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
    },
    /// A ring of N node processes on loopback, each streaming half its
    /// layers, and a chat with it: one message per line on standard input.
    Demo {
        #[command(flatten)]
        model: ModelArg,
        /// Node processes in the ring.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Tokens per answer at most.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
    },
    /// The ring benchmark: loip, ring and contiguous plans run on emulated
    /// clusters of node processes, measured beside the simulator.
    BenchRing {
        #[command(flatten)]
        model: ModelArg,
        /// Cluster sizes (3 and 5 have emulated devices).
        #[arg(long, value_delimiter = ',', default_value = "3,5")]
        nodes: Vec<usize>,
        /// Load patterns: sporadic, bursty:N.
        #[arg(long, value_delimiter = ',', default_value = "sporadic,bursty:16")]
        loads: Vec<String>,
        /// Planners to compare.
        #[arg(long, value_delimiter = ',', default_value = "loip,ring,contiguous")]
        planners: Vec<String>,
        /// Prompt tokens per request.
        #[arg(long, default_value_t = 8)]
        prompt_tokens: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 8)]
        gen_tokens: usize,
        /// Profile this host quickly (seconds) rather than fully.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        data_dir: DataDirArg,
        #[arg(long)]
        json: bool,
    },
    /// One node of `loip demo` (started by it).
    #[command(hide = true)]
    DemoNode {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        index: usize,
    },
    /// Run a cluster node: find peers, elect a leader, agree on a plan.
    Run(RunArgs),
    /// Show a running node's view: peers, leader, term, plan epoch.
    Status {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Send a generation request to the cluster through a running node
    /// (`loip run`); tokens are printed as they come.
    Ask {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_name = "IDS", value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        /// Most tokens to generate.
        #[arg(long, value_name = "N", default_value_t = 64)]
        max_tokens: usize,
        /// Stop token ids (default: the model's end-of-generation tokens).
        #[arg(long, value_name = "IDS", value_delimiter = ',')]
        stop: Option<Vec<u32>>,
        /// Give up when no token comes for this many seconds.
        #[arg(long, value_name = "S", default_value_t = 120)]
        timeout: u64,
        /// Print one JSON object: prompt_ids, tokens, finish_reason, epochs.
        #[arg(long)]
        json: bool,
    },
    /// Write a node onto a device's root filesystem: binary, config, certificate, model, systemd unit.
    Flash(FlashArgs),
    /// Create the cluster CA, or a node certificate signed by it.
    Provision {
        #[command(subcommand)]
        what: ProvisionCmd,
    },
}

/// `loip run` settings; each flag overrides the config file's key of the
/// same name (with `_` for `-`).
#[derive(Args)]
struct RunArgs {
    /// A TOML config file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Where the node keeps its state.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Directory with node.crt, node.key and ca.crt (`loip provision node`).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// The GGUF model file.
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Memory budget (300MiB, 1.5GB, 50%).
    #[arg(long, value_name = "SIZE")]
    mem_budget: Option<String>,
    /// QUIC address to listen on (default 0.0.0.0:7470).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// A static peer (repeatable), for networks that drop multicast.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// A network interface for discovery (repeatable).
    #[arg(long = "interface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Do not announce or browse over mDNS: find peers through --peer
    /// (and their gossip) only.
    #[arg(long)]
    no_mdns: bool,
    /// Nodes to wait for before the first plan.
    #[arg(long, value_name = "N")]
    expect: Option<usize>,
    /// A device TOML file describing this node (spec or profiled form);
    /// default: the stored profile, else nominal figures.
    #[arg(long, value_name = "PATH")]
    device: Option<PathBuf>,
    /// What the plan minimizes: latency or throughput.
    #[arg(long, value_name = "WHAT")]
    objective: Option<String>,
    /// Serve the OpenAI-compatible API and the chat page here
    /// (e.g. 0.0.0.0:8080); requests go to the cluster.
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<String>,
    /// Require `Authorization: Bearer KEY` on the API (not /health and the
    /// page).
    #[arg(long, value_name = "KEY", env = "LOIP_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Seconds an input may wait at this node's ring before the node calls
    /// itself stalled and asks to be planned out [default: 30].
    #[arg(long, value_name = "SECONDS")]
    stall_s: Option<u64>,
    /// As leader, keep the plan when the measured links change (no
    /// re-plan for a predicted gain; for comparisons).
    #[arg(long)]
    no_adapt: bool,
}

/// Write a node onto a target root filesystem (a directory or a mounted
/// image): the binary, its config, a node certificate from the cluster CA,
/// the model (whole or the planned units), and the enabled systemd unit.
#[derive(Args)]
struct FlashArgs {
    /// The target's root directory.
    #[arg(long, value_name = "DIR")]
    target: PathBuf,
    /// The cluster CA directory (`loip provision ca`).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// The binary to install [default: this one].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// The GGUF model to install (none: the node fetches its tensors from
    /// peers).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Only the tensors of these units (`0-13,28-41`; the unit after the
    /// last layer is the output head), as a plan gives a device.
    #[arg(long, value_name = "SPEC", requires = "model")]
    units: Option<String>,
    /// The node's memory budget (300MiB, 1.5GB, 50%).
    #[arg(long, value_name = "SIZE")]
    mem_budget: Option<String>,
    /// QUIC address to listen on (default 0.0.0.0:7470).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// A static peer (repeatable).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// Nodes to wait for before the first plan.
    #[arg(long, value_name = "N")]
    expect: Option<usize>,
    /// Print what would be written, and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Replace another cluster's identity on the target.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum ProvisionCmd {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Ca {
        /// Directory to write into (created if missing; files are never
        /// overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Create a node certificate and key, with the node id in the SAN, and
    /// copy the CA certificate beside them.
    Node {
        /// The CA directory (ca.crt, ca.key).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Directory to write node.crt, node.key and ca.crt into.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The node id (16 hex digits); random if not given.
        #[arg(long, value_name = "HEX")]
        id: Option<loip::net::NodeId>,
    },
}

#[derive(Args)]
struct ModelArg {
    /// The GGUF model file.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
}

/// Where the prompt comes from: exactly one of these.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct PromptArgs {
    /// The prompt as token ids, comma-separated.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// The prompt as text, used as it is: control tokens written in it
    /// (`<|im_start|>`) are parsed, BOS is added where the model asks.
    #[arg(long, value_name = "TEXT")]
    prompt: Option<OsString>,
    /// A user message, rendered with the chat template.
    #[arg(long, value_name = "MESSAGE")]
    chat: Option<OsString>,
}

/// How tokens are chosen. The order and exact rules are in the library's
/// `engine::sampler` documentation.
#[derive(Args)]
struct SamplingArgs {
    /// 0 chooses the most likely token (greedy); higher values flatten the
    /// distribution [default: 0 for generate, 0.8 for chat].
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample from the most likely tokens whose probabilities add up to P,
    /// in (0, 1]; 1 keeps all.
    #[arg(
        long,
        value_name = "P",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    top_p: f32,
    /// Sample from the K most likely tokens; 0 keeps all.
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: usize,
    /// Seed of the random generator: the same seed gives the same text
    /// [default: a random one].
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self, default_temperature: f32, max_tokens: usize) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(default_temperature),
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            max_tokens: Some(max_tokens),
            ..SamplingParams::default()
        }
    }
}

#[derive(Args)]
struct TemplateArg {
    /// Which chat template renders messages: `auto` does as llama.cpp
    /// (plain ChatML for a ChatML-shaped model template, else the model's
    /// own), `model` the model's own, `chatml` plain ChatML.
    #[arg(long, value_name = "WHICH", value_enum, default_value_t = TemplateName::Auto)]
    chat_template: TemplateName,
}

#[derive(Clone, Copy, ValueEnum)]
enum TemplateName {
    Auto,
    Model,
    Chatml,
}

impl From<TemplateName> for TemplateChoice {
    fn from(t: TemplateName) -> TemplateChoice {
        match t {
            TemplateName::Auto => TemplateChoice::Auto,
            TemplateName::Model => TemplateChoice::Model,
            TemplateName::Chatml => TemplateChoice::Chatml,
        }
    }
}

/// Running under a memory budget.
#[derive(Args)]
struct MemoryArgs {
    /// Memory budget: bytes with a unit (300MiB, 1.5GB) or a percentage of
    /// the model (50%). Units that do not fit are streamed from storage.
    /// Without it, every weight is resident.
    #[arg(long, value_name = "SIZE")]
    mem_budget: Option<String>,
    /// Streaming slots (K): units read ahead of use.
    #[arg(long, value_name = "K", default_value = "2")]
    slots: NonZeroUsize,
    /// How streamed units are read: prefetch (a loader thread reads ahead),
    /// on-demand (read when needed: a baseline) or mmap (the page cache
    /// decides: a baseline that ignores the budget).
    #[arg(long, value_name = "MODE", default_value = "prefetch")]
    load_mode: String,
}

impl MemoryArgs {
    fn parse(&self) -> Result<Option<(Budget, LoadMode, usize)>> {
        let Some(mode) = LoadMode::parse(&self.load_mode) else {
            bail!(
                "unknown --load-mode {:?}: use prefetch, on-demand or mmap",
                self.load_mode
            );
        };
        let budget = match &self.mem_budget {
            Some(b) => Budget::parse(b)?,
            None if mode == LoadMode::Prefetch => return Ok(None),
            None => Budget::Percent(100.0),
        };
        Ok(Some((budget, mode, self.slots.get())))
    }
}

#[derive(Args)]
struct DataDirArg {
    /// The node's data directory [default: $LOIP_DATA_DIR, else
    /// $XDG_DATA_HOME/loip, else ~/.local/share/loip].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl DataDirArg {
    fn get(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(loip::store::default_dir)
    }
}

#[derive(Args)]
struct ThreadsArg {
    /// Compute threads [default: the number of CPUs].
    #[arg(long, value_name = "T")]
    threads: Option<NonZeroUsize>,
}

#[derive(Args)]
struct BackendArg {
    /// Compute backend: cpu, cuda (an error without a usable GPU) or auto
    /// (the GPU when there is one, else the CPU).
    #[arg(long, value_name = "B", default_value = "cpu")]
    backend: BackendChoice,
}

impl ThreadsArg {
    fn get(&self) -> usize {
        self.threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get)
    }
}

fn main() -> ExitCode {
    quiet_panics();
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    if loip::cluster::service::logging_to_journal() {
        logger.format(|out, r| {
            loip::cluster::service::journal_line(out, r.level(), r.target(), r.args())
        });
    } else {
        // A cluster's events (a loss, a plan, a resubmission) are often
        // within one second of each other.
        logger.format_timestamp_millis();
    }
    logger.init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) if e.is::<AlreadyReported>() => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// A bug must still end in one line, not a panic message and backtrace,
/// unless RUST_BACKTRACE asks for them.
fn quiet_panics() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = msg.replace('\n', " ");
        eprintln!("error: internal error{at}: {msg} (a bug in loip; RUST_BACKTRACE=1 shows more)");
    }));
}

/// The error and its causes on one line, leaving out a cause whose text
/// the message before it already includes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// `loip ... | head` closing the pipe is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// A failure whose `error:` lines were already printed: exit with 1 and
/// print nothing more.
#[derive(Debug)]
struct AlreadyReported;

impl std::fmt::Display for AlreadyReported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("failures were reported above")
    }
}

impl std::error::Error for AlreadyReported {}

fn loading(path: &Path) -> String {
    format!("loading {}", path.display())
}

fn open_model(path: &Path) -> Result<Arc<Model>> {
    let m = Model::open(path).with_context(|| loading(path))?;
    Ok(Arc::new(m))
}

/// The file's metadata alone, so that a bad tokenizer or template is
/// reported before the weights are read.
fn open_gguf(path: &Path) -> Result<Arc<Gguf>> {
    let g = Gguf::open(path).with_context(|| loading(path))?;
    Ok(Arc::new(g))
}

fn open_tokenizer(path: &Path, gguf: &Gguf) -> Result<Tokenizer> {
    Tokenizer::from_gguf(gguf.metadata()).with_context(|| loading(path))
}

fn open_template(
    path: &Path,
    gguf: &Gguf,
    tokenizer: &Tokenizer,
    which: TemplateName,
) -> Result<ChatTemplate> {
    ChatTemplate::for_model(gguf.metadata(), tokenizer, which.into()).with_context(|| loading(path))
}

/// A text argument as UTF-8; anything else is an error naming the option.
fn utf8<'a>(option: &str, text: &'a OsStr) -> Result<&'a str> {
    std::str::from_utf8(text.as_encoded_bytes())
        .with_context(|| format!("{option} is not valid UTF-8"))
}

/// Token text for people: valid UTF-8 as a quoted, escaped string; bytes
/// that are part of a character as `\xNN`.
fn show_bytes(bytes: &[u8]) -> String {
    let mut s = String::from("\"");
    for chunk in bytes.utf8_chunks() {
        s.extend(chunk.valid().chars().flat_map(char::escape_debug));
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02X}"));
        }
    }
    s.push('"');
    s
}

/// Writes streamed text as it comes. A failed write (a closed pipe) is
/// kept, and cancels generation through `cancel`.
struct StreamOut<'a, W: Write> {
    out: W,
    cancel: &'a AtomicBool,
    error: Option<io::Error>,
}

impl<W: Write> StreamOut<'_, W> {
    fn write(&mut self, text: &str) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
        {
            self.error = Some(e);
            self.cancel.store(true, Ordering::Relaxed);
        }
    }

    fn finish(self) -> io::Result<()> {
        self.error.map_or(Ok(()), Err)
    }
}

fn print_timings(c: &Completion) {
    eprintln!(
        "prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s",
        c.timings.prefill_tokens,
        c.timings.prefill_tok_s,
        c.timings.decode_tokens,
        c.timings.decode_tok_s
    );
}

/// Set by Ctrl-C during `loip chat`: stops the answer being produced.
static CANCEL: AtomicBool = AtomicBool::new(false);

/// One line of chat input.
enum Line {
    Text(String),
    /// Not UTF-8: what to report.
    Invalid(String),
    End,
}

/// Where chat messages come from: a line editor on a terminal, plain lines
/// otherwise (a pipe, a file).
enum ChatInput {
    Editor(Box<rustyline::DefaultEditor>),
    Lines {
        stdin: io::StdinLock<'static>,
        line: usize,
    },
}

impl ChatInput {
    fn new() -> Result<ChatInput> {
        if io::stdin().is_terminal() {
            let editor = rustyline::DefaultEditor::new().context("opening the terminal")?;
            Ok(ChatInput::Editor(Box::new(editor)))
        } else {
            Ok(ChatInput::Lines {
                stdin: io::stdin().lock(),
                line: 0,
            })
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, ChatInput::Editor(_))
    }

    fn next(&mut self) -> Result<Line> {
        match self {
            ChatInput::Editor(editor) => loop {
                match editor.readline("> ") {
                    Ok(text) => {
                        // In-memory history, for the arrow keys.
                        let _ = editor.add_history_entry(text.as_str());
                        return Ok(Line::Text(text));
                    }
                    // Ctrl-C at the prompt clears the line, as in a shell.
                    Err(rustyline::error::ReadlineError::Interrupted) => continue,
                    Err(rustyline::error::ReadlineError::Eof) => return Ok(Line::End),
                    Err(e) => return Err(e).context("reading the terminal"),
                }
            },
            ChatInput::Lines { stdin, line } => {
                let mut buf = Vec::new();
                if stdin
                    .read_until(b'\n', &mut buf)
                    .context("reading standard input")?
                    == 0
                {
                    return Ok(Line::End);
                }
                *line += 1;
                let text = buf.strip_suffix(b"\n").unwrap_or(&buf);
                let text = text.strip_suffix(b"\r").unwrap_or(text);
                Ok(match String::from_utf8(text.to_vec()) {
                    Ok(text) => Line::Text(text),
                    Err(e) => Line::Invalid(format!(
                        "input line {line} is not valid UTF-8 ({}); it was skipped",
                        e.utf8_error()
                    )),
                })
            }
        }
    }
}

/// The chat loop: each line is a message; answers are streamed (or printed
/// as JSON lines). A message that fails is reported and skipped; the exit
/// status then says so at the end.
fn chat(session: &mut ChatSession, json: bool, out: &mut impl Write) -> Result<()> {
    ctrlc::set_handler(|| CANCEL.store(true, Ordering::Relaxed))
        .context("installing the Ctrl-C handler")?;
    let mut input = ChatInput::new()?;
    if input.is_terminal() {
        eprintln!("Ctrl-C stops an answer, Ctrl-D ends the chat.");
    }
    let mut failed = false;
    loop {
        let text = match input.next()? {
            Line::Text(text) => text,
            Line::Invalid(message) => {
                eprintln!("error: {message}");
                failed = true;
                continue;
            }
            Line::End => break,
        };
        if text.trim().is_empty() {
            continue;
        }
        CANCEL.store(false, Ordering::Relaxed);
        let mut stream = StreamOut {
            out: &mut *out,
            cancel: &CANCEL,
            error: None,
        };
        let turn = session.reply(&text, Some(&CANCEL), |piece| {
            if !json {
                stream.write(piece);
            }
        });
        stream.finish()?;
        match turn {
            Ok(turn) if json => writeln!(out, "{}", serde_json::to_string(&turn)?)?,
            Ok(turn) => {
                writeln!(out)?;
                if input.is_terminal() && turn.completion.finish_reason == FinishReason::Cancelled {
                    eprintln!("[stopped]");
                }
            }
            Err(e) => {
                eprintln!("error: {}", one_line(&e.into()));
                failed = true;
            }
        }
        out.flush()?;
    }
    if failed {
        return Err(AlreadyReported.into());
    }
    Ok(())
}

fn ids_line(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// `loip demo`: starts the ring, then answers each line of standard input.
fn demo(model: &Path, nodes: usize, max_tokens: usize, out: &mut impl Write) -> Result<()> {
    let exe = std::env::current_exe().context("finding the loip binary")?;
    let mut demo = loip::cluster::ring::demo::Demo::start(&exe, model, nodes, max_tokens)
        .with_context(|| loading(model))?;
    eprintln!("loip demo: {nodes} node processes on loopback, half of each window streamed; one message per line");
    for line in io::stdin().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match demo.chat.reply(&line) {
            Ok(text) => writeln!(out, "{text}")?,
            Err(e) => eprintln!("error: {e}"),
        }
        out.flush()?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let mut out = io::stdout().lock();
    match cli.command {
        Command::Inspect { model, json } => {
            let path = &model.model;
            let g = Gguf::open(path).with_context(|| format!("loading {}", path.display()))?;
            let s = inspect::summary(&g).with_context(|| format!("loading {}", path.display()))?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&s)?)?;
            } else {
                write!(out, "{s}")?;
            }
        }
        Command::Tokenize {
            model,
            text,
            no_special,
            json,
        } => {
            let path = &model.model;
            let gguf = open_gguf(path)?;
            let tokenizer = open_tokenizer(path, &gguf)?;
            let ids = if text == "-" {
                let mut bytes = Vec::new();
                io::stdin()
                    .read_to_end(&mut bytes)
                    .context("reading standard input")?;
                tokenizer
                    .encode_bytes(&bytes, !no_special)
                    .context("encoding standard input")?
            } else {
                tokenizer
                    .encode_bytes(text.as_encoded_bytes(), !no_special)
                    .context("encoding the text")?
            };
            if json {
                let pieces: Vec<String> = ids
                    .iter()
                    .map(|&id| String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned())
                    .collect();
                let v = serde_json::json!({ "ids": ids, "pieces": pieces });
                writeln!(out, "{v}")?;
            } else {
                for &id in &ids {
                    writeln!(out, "{id:>6}  {}", show_bytes(tokenizer.token_bytes(id)))?;
                }
            }
        }
        Command::Generate {
            model,
            prompt,
            system,
            template,
            max_tokens,
            sampling,
            threads,
            backend,
            memory,
            json,
            stream,
        } => {
            resolve_backend(backend.backend)?;
            let path = &model.model;
            let params = sampling.params(0.0, max_tokens);
            params.validate()?;
            let gguf = open_gguf(path)?;
            let ids_only = prompt.prompt_ids.is_some();
            let (tokenizer, prompt_ids) = if let Some(ids) = prompt.prompt_ids {
                let tokenizer = Tokenizer::from_gguf_if_present(gguf.metadata())
                    .with_context(|| loading(path))?;
                (tokenizer, ids)
            } else if let Some(text) = &prompt.prompt {
                let tokenizer = open_tokenizer(path, &gguf)?;
                let ids = tokenizer.encode_prompt(utf8("--prompt", text)?)?;
                (Some(tokenizer), ids)
            } else if let Some(message) = &prompt.chat {
                let tokenizer = open_tokenizer(path, &gguf)?;
                let template = open_template(path, &gguf, &tokenizer, template.chat_template)?;
                let mut chat = Vec::with_capacity(2);
                if let Some(s) = &system {
                    chat.push(ChatMessage::new(Role::System, utf8("--system", s)?));
                }
                chat.push(ChatMessage::new(Role::User, utf8("--chat", message)?));
                let text = template.render(&chat, true)?;
                let ids = tokenizer.encode_prompt(&text)?;
                (Some(tokenizer), ids)
            } else {
                bail!("no prompt given: pass --prompt, --chat or --prompt-ids");
            };
            drop(gguf);
            let positions = prompt_ids.len() + max_tokens;
            let demand = |slots| Demand {
                batch: 1,
                positions,
                slots,
            };
            let (mut engine, _) = open_engine(path, threads.get(), memory.parse()?, demand)
                .with_context(|| loading(path))?;
            let eos = engine.model().config.eos_token;
            let cancel = AtomicBool::new(false);
            let request = Request {
                prompt: &prompt_ids,
                params: &params,
                cancel: Some(&cancel),
            };
            let completion = match &tokenizer {
                Some(tokenizer) => {
                    let mut printer = StreamOut {
                        out: io::stdout(),
                        cancel: &cancel,
                        error: None,
                    };
                    let c = engine.generate_text(tokenizer, &request, |piece| {
                        if stream {
                            printer.write(piece);
                        }
                    })?;
                    printer.finish()?;
                    c
                }
                None => {
                    // No tokenizer: the end token from the model's config.
                    let params = SamplingParams {
                        stop_tokens: eos.into_iter().collect(),
                        ..params.clone()
                    };
                    engine.generate_ids(&Request {
                        params: &params,
                        ..request
                    })?
                }
            };
            if json {
                writeln!(out, "{}", serde_json::to_string(&completion)?)?;
            } else {
                if ids_only {
                    writeln!(out, "{}", ids_line(&completion.tokens))?;
                } else {
                    if !stream {
                        write!(out, "{}", completion.text.as_deref().unwrap_or(""))?;
                    }
                    writeln!(out)?;
                }
                print_timings(&completion);
            }
        }
        Command::Chat {
            model,
            system,
            template,
            max_tokens,
            sampling,
            threads,
            json,
        } => {
            let path = &model.model;
            let params = sampling.params(0.8, max_tokens);
            params.validate()?;
            let system = system.as_deref().map(|s| utf8("--system", s)).transpose()?;
            let gguf = open_gguf(path)?;
            let tokenizer = open_tokenizer(path, &gguf)?;
            let template = open_template(path, &gguf, &tokenizer, template.chat_template)?;
            // Resident: an answer's length is not known up front, so there
            // is no demand to plan a memory budget for.
            let engine = Engine::new(open_model(path)?, threads.get());
            let mut session = ChatSession::new(engine, tokenizer, template, params)?;
            if let Some(s) = system {
                session.push(ChatMessage::new(Role::System, s));
            }
            chat(&mut session, json, &mut out)?;
        }
        Command::Score {
            model,
            ids,
            threads,
            json,
        } => {
            let m = open_model(&model.model)?;
            let mut engine = Engine::new(m, threads.get());
            let positions = engine.score(&ids)?;
            if json {
                let v = serde_json::json!({ "positions": positions });
                writeln!(out, "{v}")?;
            } else {
                for (i, p) in positions.iter().enumerate() {
                    let top: Vec<String> =
                        p.top.iter().map(|(id, v)| format!("{id}:{v:.4}")).collect();
                    write!(
                        out,
                        "{i:>5}  id {:>6}  argmax {:>6}  top {}",
                        ids[i],
                        p.argmax,
                        top.join(" ")
                    )?;
                    if let Some(lp) = p.logprob_next {
                        write!(out, "  logprob(next {}) {lp:.4}", ids[i + 1])?;
                    }
                    writeln!(out)?;
                }
            }
        }
        Command::Bench {
            model,
            threads,
            backend,
            prompt_tokens,
            gen_tokens,
            batch,
            repeat,
            memory,
            json,
        } => {
            resolve_backend(backend.backend)?;
            let positions = prompt_tokens.get() + gen_tokens.get();
            let (mut engine, placement) =
                open_engine(&model.model, threads.get(), memory.parse()?, |slots| {
                    Demand {
                        batch: batch.get(),
                        positions,
                        slots,
                    }
                })
                .with_context(|| format!("loading {}", model.model.display()))?;
            let spec = BenchSpec {
                prompt_tokens: prompt_tokens.get(),
                gen_tokens: gen_tokens.get(),
                batch: batch.get(),
                repeat: repeat.get(),
                cold_file: (memory.load_mode == "mmap").then(|| model.model.clone()),
                ..BenchSpec::default()
            };
            let mut report = bench::run(&mut engine, &spec)?;
            report.set_placement(placement);
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                write!(out, "{report}")?;
            }
        }
        Command::Profile {
            model,
            threads,
            data_dir,
            refresh,
            quick,
            mem_budget,
            write_toml,
            json,
        } => {
            let spec = ProfileSpec {
                model: model.model.clone(),
                threads: threads.get(),
                quick,
                budget: mem_budget.as_deref().map(Budget::parse).transpose()?,
                progress: !json,
            };
            let outcome = profiling::profile(&spec, &data_dir.get(), refresh)
                .with_context(|| format!("profiling with {}", model.model.display()))?;
            if let Some(path) = write_toml {
                std::fs::write(&path, outcome.stored.device.to_toml())
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if json {
                writeln!(out, "{}", serde_json::to_string(&outcome)?)?;
            } else {
                write!(out, "{outcome}")?;
            }
        }
        Command::Validate {
            model,
            threads,
            budgets,
            batches,
            slots,
            prompt_tokens,
            steps,
            quick,
            retry,
            json,
        } => {
            let spec = ValidationSpec {
                budgets,
                batches: batches.iter().map(|b| b.get()).collect(),
                slots: slots.get(),
                prompt_tokens: prompt_tokens.get(),
                steps: steps.get(),
                quick_profile: quick,
                retry_failed: retry,
                progress: !json,
                ..ValidationSpec::new(model.model.clone(), threads.get())
            };
            let report = validate::run(&spec)
                .with_context(|| format!("validating with {}", model.model.display()))?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                write!(out, "{report}")?;
            }
            // A benchmark that fails says so in its exit status, so scripts
            // and CI jobs that run it can gate on it.
            if !report.passes() {
                anyhow::bail!(
                    "the prediction is off by {:.1}% on one row, more than the {:.0}% tolerance",
                    report.worst_error() * 100.0,
                    report.tolerance * 100.0
                );
            }
        }
        Command::Plan {
            model,
            model_spec,
            devices,
            link,
            pattern,
            planner,
            objective,
            prompt_tokens,
            output_tokens,
            context_tokens,
            data_dir,
            json,
        } => {
            let shape = match (&model, &model_spec) {
                (Some(path), _) => ModelShape::from_gguf(path)
                    .with_context(|| format!("loading {}", path.display()))?,
                (None, Some(name)) => ModelShape::preset(name)
                    .with_context(|| format!("unknown --model-spec {name:?}; known: llama3-70b"))?,
                (None, None) => bail!("give --model or --model-spec"),
            };
            let devices = devices
                .iter()
                .map(|d| -> Result<DeviceSource> {
                    if d != "self" {
                        return Ok(DeviceSource::File(d.into()));
                    }
                    let Some(path) = &model else {
                        bail!("--devices self needs --model: a profile is made for one model file");
                    };
                    let stored = profiling::stored_profile(path, &data_dir.get(), None)?
                        .ok_or_else(|| PlanError::NoProfile {
                            model: path.display().to_string(),
                        })?;
                    Ok(DeviceSource::Profile(stored.device))
                })
                .collect::<Result<Vec<_>>>()?;
            let objective = match objective.as_deref() {
                None => None,
                Some("latency") => Some(Objective::Latency),
                Some("throughput") => Some(Objective::Throughput),
                Some(o) => bail!("unknown --objective {o:?}: use latency or throughput"),
            };
            let req = PlanRequest {
                model: shape,
                devices,
                link: link.parse()?,
                workload: Workload {
                    prompt_tokens,
                    output_tokens,
                    context_tokens,
                    ..Workload::new(pattern.parse::<Pattern>()?)
                },
                objective,
                planner: planner.parse::<Planner>()?,
            };
            let report = plan_report(&req)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                write!(out, "{report}")?;
            }
        }
        Command::Synth { out: path, preset } => {
            let Some(spec) = SynthSpec::preset(&preset) else {
                bail!(
                    "unknown preset {preset:?}; valid presets: {}",
                    SynthSpec::PRESETS.join(", ")
                );
            };
            spec.write(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            writeln!(out, "wrote {} (preset {preset})", path.display())?;
        }
        Command::Serve {
            model,
            host,
            port,
            api_key,
            max_batch,
            queue,
            context,
            template,
            threads,
            backend,
            memory,
            max_body,
            header_timeout,
            stall_timeout,
            no_mdns,
            no_adapt,
            data_dir,
        } => {
            resolve_backend(backend.backend)?;
            let secs = |name: &str, s: f64| {
                std::time::Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .with_context(|| format!("{name} must be a positive number of seconds"))
            };
            let config = loip::serve::ServeConfig {
                model: model.model,
                addr: std::net::SocketAddr::new(host, port),
                api_key: api_key.filter(|k| !k.is_empty()),
                max_batch: max_batch.get(),
                queue,
                context: context.map(NonZeroUsize::get),
                threads: threads.get(),
                memory: memory.parse()?,
                adapt: !no_adapt,
                data_dir: Some(data_dir.get()),
                template: template.chat_template.into(),
                limits: loip::serve::Limits {
                    body_bytes: max_body,
                    header_timeout: secs("--header-timeout", header_timeout)?,
                    sse_stall: secs("--stall-timeout", stall_timeout)?,
                    ..loip::serve::Limits::default()
                },
                mdns: !no_mdns,
            };
            loip::serve::run(config, |addr| {
                eprintln!("loip: serving on http://{addr}");
            })?;
        }
        Command::Flash(args) => flash(&mut out, args)?,
        Command::Provision { what } => provision(&mut out, what)?,
        Command::Run(args) => run_node(args)?,
        Command::Demo {
            model,
            nodes,
            max_tokens,
        } => demo(&model.model, nodes, max_tokens, &mut out)?,
        Command::DemoNode { dir, index } => loip::cluster::ring::demo::run_child(&dir, index)?,
        Command::Ask {
            data_dir,
            prompt_ids,
            max_tokens,
            stop,
            timeout,
            json,
        } => {
            use loip::cluster::client::{ask, AskRequest};
            let req = AskRequest {
                prompt: prompt_ids.clone(),
                max_tokens,
                stop,
                sampling: Default::default(),
            };
            let mut first = true;
            let r = ask(
                &data_dir,
                &req,
                std::time::Duration::from_secs(timeout),
                |t| {
                    if !json {
                        let _ = write!(out, "{}{t}", if first { "" } else { "," });
                        let _ = out.flush();
                        first = false;
                    }
                },
            )?;
            if json {
                let v = serde_json::json!({
                    "prompt_ids": prompt_ids,
                    "tokens": r.tokens,
                    "finish_reason": r.finish,
                    "epochs": r.epochs,
                });
                writeln!(out, "{v}")?;
            } else {
                writeln!(out)?;
            }
        }
        Command::BenchRing {
            model,
            nodes,
            loads,
            planners,
            prompt_tokens,
            gen_tokens,
            quick,
            data_dir,
            json,
        } => {
            let spec = loip::cluster::ring::bench::BenchSpec {
                model: model.model.clone(),
                nodes,
                loads: loads.iter().map(|l| l.parse()).collect::<Result<_, _>>()?,
                planners: planners
                    .iter()
                    .map(|p| p.parse())
                    .collect::<Result<_, _>>()?,
                prompt_tokens,
                gen_tokens,
                exe: std::env::current_exe().context("finding the loip binary")?,
                data_dir: data_dir.get(),
                quick_profile: quick,
            };
            let report =
                loip::cluster::ring::bench::run(&spec).with_context(|| loading(&model.model))?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                write!(out, "{report}")?;
            }
        }
        Command::Status { data_dir, json } => {
            let st = loip::cluster::shell::read_status(&data_dir)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&st)?)?;
            } else {
                print_status(&mut out, &st)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn flash(out: &mut impl Write, a: FlashArgs) -> Result<()> {
    use loip::cluster::flash::{Flash, FlashSpec};
    let binary = match a.binary {
        Some(b) => b,
        None => std::env::current_exe().context("finding this executable")?,
    };
    let plan = Flash::plan(FlashSpec {
        target: a.target.clone(),
        ca: a.ca,
        binary,
        model: a.model,
        units: a.units,
        mem_budget: a.mem_budget,
        listen: a.listen,
        peers: a.peers,
        expect: a.expect,
        force: a.force,
    })?;
    for step in &plan.steps {
        writeln!(out, "{step}")?;
    }
    if a.dry_run {
        writeln!(out, "dry run: nothing written to {}", a.target.display())?;
    } else {
        plan.apply()?;
        writeln!(out, "flashed {}", a.target.display())?;
    }
    Ok(())
}

fn provision(out: &mut impl Write, what: ProvisionCmd) -> Result<()> {
    use loip::net::identity;
    match what {
        ProvisionCmd::Ca { out: dir } => {
            let ca = identity::create_ca(&dir)?;
            let fp: String = ca.fingerprint.iter().map(|b| format!("{b:02x}")).collect();
            writeln!(out, "wrote {} and {}", ca.cert.display(), ca.key.display())?;
            writeln!(out, "cluster fingerprint {fp}")?;
        }
        ProvisionCmd::Node { ca, out: dir, id } => {
            let id = id.unwrap_or_else(identity::random_node_id);
            let node = identity::create_node(&ca, &dir, id)?;
            writeln!(
                out,
                "node {}: wrote {}, {} and {}",
                node.id,
                node.cert.display(),
                node.key.display(),
                node.ca.display()
            )?;
        }
    }
    Ok(())
}

fn run_node(args: RunArgs) -> Result<()> {
    use loip::cluster::config::FileConfig;
    let file = match &args.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let non_empty = |v: Vec<String>| (!v.is_empty()).then_some(v);
    let flags = FileConfig {
        data_dir: args.data_dir,
        identity: args.identity,
        model: args.model,
        mem_budget: args.mem_budget,
        listen: args.listen,
        peers: non_empty(args.peers),
        interfaces: non_empty(args.interfaces),
        mdns: args.no_mdns.then_some(false),
        expect: args.expect,
        device: args.device,
        objective: args.objective,
        http: args.http,
        api_key: args.api_key,
        stall_s: args.stall_s,
        adapt: args.no_adapt.then_some(false),
    };
    let cfg = flags.over(file).validate()?;
    if let Some(m) = &cfg.model {
        if !m.is_file() {
            bail!("model {}: not a file", m.display());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async {
        loip::cluster::service::spawn_watchdog();
        let http = loip::serve::cluster::http_config(&cfg);
        loip::cluster::shell::run(cfg, |node| {
            println!("node {} listening on {}", node.id, node.listen);
            let _ = io::stdout().flush();
            loip::cluster::service::ready(&format!("node {} on {}", node.id, node.listen));
            if let Some(http) = http {
                loip::serve::cluster::spawn(http, node, |addr| {
                    eprintln!("loip: serving on http://{addr}");
                });
            }
        })
        .await
    });
    loip::cluster::service::stopping();
    result?;
    Ok(())
}

fn print_status(out: &mut impl Write, st: &loip::cluster::shell::NodeStatus) -> Result<()> {
    let m = &st.membership;
    writeln!(out, "node     {} ({:?}) on {}", st.id, m.role, st.listen)?;
    let leader = m.leader.map_or("none".to_string(), |l| l.to_string());
    writeln!(out, "leader   {leader}, term {}", m.term)?;
    let members: Vec<String> = m.committed.ids().map(|i| i.to_string()).collect();
    writeln!(
        out,
        "plan     epoch {}: {}",
        m.committed.epoch,
        members.join(" ")
    )?;
    if let Some((term, epoch)) = m.pending {
        writeln!(out, "pending  epoch {epoch} (term {term})")?;
    }
    for (id, live) in &m.peers {
        let addr = st
            .connected
            .iter()
            .find(|(i, _)| i == id)
            .map_or("not connected".to_string(), |(_, a)| a.to_string());
        let state = if *live { "live" } else { "silent" };
        writeln!(out, "peer     {id} {state} {addr}")?;
    }
    if let Some(addr) = st.duplicate_id {
        writeln!(
            out,
            "WARNING  the process at {addr} presents this node's id: two devices share one identity"
        )?;
    }
    match &st.discovery {
        Some(d) => writeln!(
            out,
            "mdns     {} peers found, {} adverts ignored, {} offered to dial, {} daemon restarts",
            d.peers, d.ignored, d.offered, d.restarts
        )?,
        None => writeln!(out, "mdns     off")?,
    }
    if let Some(p) = &st.plan {
        let ring: Vec<String> = p.ring.iter().map(|i| i.to_string()).collect();
        if !ring.is_empty() {
            writeln!(
                out,
                "ring     {} ({} units, {} slots)",
                ring.join(" "),
                p.n_units,
                p.slots
            )?;
        }
        if let Some(note) = &p.note {
            writeln!(out, "note     {note}")?;
        }
        for (id, why) in &p.unfit {
            let verdict = if p.kept_unfit {
                "kept although unfit (the others cannot hold the model)"
            } else {
                "planned out"
            };
            writeln!(out, "unfit    {id} {verdict}: {why}")?;
        }
        let unreported: Vec<String> = st
            .membership
            .committed
            .members
            .iter()
            .filter(|m| !p.planned_with.contains(&m.id))
            .map(|m| m.id.to_string())
            .collect();
        // An empty list: no plan was made (no model), or an older node wrote it.
        if p.epoch == st.membership.committed.epoch
            && !p.planned_with.is_empty()
            && !unreported.is_empty()
        {
            writeln!(
                out,
                "reports  the plan was made before {} reported; the leader plans again",
                unreported.join(" ")
            )?;
        }
        if let Some(shard) = &p.shard {
            writeln!(out, "shard    {}", shard.display())?;
        }
    }
    if st.windows.is_empty() {
        writeln!(out, "windows  none")?;
    } else {
        writeln!(out, "windows  {}", st.windows.join(", "))?;
    }
    if let Some(r) = &st.ring {
        let c = &r.counts;
        writeln!(
            out,
            "ring run epoch {}{}: {} window runs, {} tokens, {} stale, {} bad",
            r.epoch,
            if r.head { " (takes requests)" } else { "" },
            c.window_runs,
            c.tokens,
            c.stale,
            c.bad
        )?;
        if c.memory_budget_bytes > 0 {
            writeln!(
                out,
                "kv       {} unit(s) demoted now ({} demotions, {} promotions); room for {} positions of KV{}",
                c.demoted_units,
                c.demotions,
                c.promotions,
                c.kv_positions,
                if r.head {
                    format!("; {} request(s) waiting for KV room", c.kv_waiting)
                } else {
                    String::new()
                }
            )?;
        }
    }
    if let Some(e) = &st.ring_error {
        writeln!(out, "ring err {e}")?;
    }
    for l in &st.links {
        writeln!(
            out,
            "link     {} {:.0} Mbit/s, {:.3} ms one way ({:.0} s ago)",
            l.peer,
            l.bandwidth_bps / 1e6,
            l.latency_s * 1e3,
            l.age_s
        )?;
    }
    if let Some(e) = &st.prepare_error {
        writeln!(out, "prepare  failed: {e}")?;
    }
    if st.malformed_frames + st.out_of_epoch_frames > 0 {
        writeln!(
            out,
            "frames   {} malformed, {} out of epoch (dropped)",
            st.malformed_frames, st.out_of_epoch_frames
        )?;
    }
    Ok(())
}
