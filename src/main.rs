//! The `loip` command line: parse arguments, call the library, print.
//!
//! Every failure is one line `error: ...` on stderr with exit code 1; clap's
//! usage errors exit with 2.

use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use loip::engine::bench::{self, BenchSpec};
use loip::engine::generate::Engine;
use loip::engine::offload::{open_engine, Budget, Demand, LoadMode};
use loip::engine::weights::Model;
use loip::model::gguf::Gguf;
use loip::model::inspect;
use loip::model::synth::SynthSpec;

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
    /// Generate greedily; stops at the model's end-of-generation token or
    /// after --max-tokens.
    Generate {
        #[command(flatten)]
        model: ModelArg,
        #[command(flatten)]
        prompt: PromptArgs,
        /// Most tokens to generate.
        #[arg(long, value_name = "N", default_value_t = 64)]
        max_tokens: usize,
        #[command(flatten)]
        threads: ThreadsArg,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Print one JSON object: prompt_ids, tokens, timings.
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
    /// Write a model with random weights in a preset shape.
    Synth {
        /// Where to write the GGUF file.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// The preset shape, e.g. tiny (an unknown name lists them all).
        #[arg(long, value_name = "NAME")]
        preset: String,
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
    /// Nodes to wait for before the first plan.
    #[arg(long, value_name = "N")]
    expect: Option<usize>,
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
struct ThreadsArg {
    /// Compute threads [default: the number of CPUs].
    #[arg(long, value_name = "T")]
    threads: Option<NonZeroUsize>,
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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
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

fn open_model(path: &Path) -> Result<Arc<Model>> {
    let m = Model::open(path).with_context(|| format!("loading {}", path.display()))?;
    Ok(Arc::new(m))
}

fn ids_line(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
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
        Command::Generate {
            model,
            prompt,
            max_tokens,
            threads,
            memory,
            json,
        } => {
            let Some(prompt_ids) = prompt.prompt_ids else {
                bail!("no prompt given: pass --prompt-ids");
            };
            let positions = prompt_ids.len() + max_tokens;
            let (mut engine, _) =
                open_engine(&model.model, threads.get(), memory.parse()?, |slots| {
                    Demand {
                        batch: 1,
                        positions,
                        slots,
                    }
                })
                .with_context(|| format!("loading {}", model.model.display()))?;
            let stop = engine.model().config.eos_token;
            let g = engine.generate_greedy(&prompt_ids, max_tokens, stop)?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&g)?)?;
            } else {
                writeln!(out, "{}", ids_line(&g.tokens))?;
                eprintln!(
                    "prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s",
                    g.timings.prefill_tokens,
                    g.timings.prefill_tok_s,
                    g.timings.decode_tokens,
                    g.timings.decode_tok_s
                );
            }
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
            prompt_tokens,
            gen_tokens,
            batch,
            repeat,
            memory,
            json,
        } => {
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
        Command::Provision { what } => provision(&mut out, what)?,
        Command::Run(args) => run_node(args)?,
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
        expect: args.expect,
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
    rt.block_on(loip::cluster::shell::run(cfg, |id, addr| {
        println!("node {id} listening on {addr}");
        let _ = io::stdout().flush();
    }))?;
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
    if st.windows.is_empty() {
        writeln!(out, "windows  none (no model plan yet)")?;
    } else {
        writeln!(out, "windows  {}", st.windows.join(" "))?;
    }
    Ok(())
}
