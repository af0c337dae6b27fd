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
        /// Measure a row outside the 15% tolerance once more.
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
    }
    out.flush()?;
    Ok(())
}
