//! The `loip` command line: parse arguments, call the library, print.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use loip::engine::generate::Engine;
use loip::engine::weights::Model;

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
    /// Generate greedily from token ids.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Vec<u32>,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long)]
        json: bool,
    },
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            model,
            prompt_ids,
            max_tokens,
            threads,
            json,
        } => {
            let m = Arc::new(
                Model::open(&model).with_context(|| format!("loading {}", model.display()))?,
            );
            let stop = m.config.eos_token;
            let mut engine = Engine::new(m, threads.unwrap_or_else(default_threads));
            let g = engine.generate_greedy(&prompt_ids, max_tokens, stop)?;
            if json {
                println!("{}", serde_json::to_string(&g)?);
            } else {
                println!("{:?}", g.tokens);
                eprintln!(
                    "prefill {:.1} tok/s, decode {:.1} tok/s",
                    g.timings.prefill_tok_s, g.timings.decode_tok_s
                );
            }
        }
    }
    Ok(())
}
