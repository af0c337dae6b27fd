//! The HTTP API in front of a cluster (`loip run --http`): every node
//! serves it, and sends each request to the head of the committed plan
//! through its [`ClusterClient`] (straight to the ring on the head, over
//! QUIC from any other node). The client keeps what a request has
//! produced and resumes it on the next plan when a node is lost, so an
//! answer survives a re-plan.
//!
//! Requests come off the same bounded queue as on a single node; a
//! dispatcher thread takes one whenever fewer than `max_batch` run (the
//! ring batches the running ones itself) and runs it as a task on the
//! HTTP runtime: token ids in, text out through the request's
//! [`TextStream`] (detokenization, stop strings, stop tokens,
//! `max_tokens`). A request whose client went away, or took nothing for
//! the stall timeout, is dropped, which cancels it in the ring.
//!
//! # Ready
//!
//! The tokenizer and chat template come from the node's model file or,
//! on a node that started without one, from the shard it fetched (which
//! keeps the model's metadata). `/health` answers 200 once they are loaded
//! and a plan with windows is committed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Semaphore};

use super::api::Usage;
use super::http::{AppState, Loaded};
use super::metrics::Outcome;
use super::scheduler::{Event, Job, Rate};
use super::{Limits, ServeConfig, ServeError};
use crate::cluster::client::{self, ClientError, ClusterClient, GenerateRequest, Sampling};
use crate::cluster::config::RunConfig;
use crate::cluster::prepare::SHARD_FILE;
use crate::cluster::shell::NodeStatus;
use crate::cluster::shell::Running;
use crate::cluster::stats::PeerStats;
use crate::engine::sampler::{FinishReason, TextStream};
use crate::model::chat::ChatTemplate;
use crate::model::chat::TemplateChoice;
use crate::model::gguf::Gguf;
use crate::model::tokenizer::Tokenizer;

/// What the HTTP server of a cluster node needs from the node.
#[derive(Clone)]
pub struct ClusterSide {
    pub client: ClusterClient,
    /// The node's view, as `loip status` shows it.
    pub status: watch::Receiver<Option<NodeStatus>>,
    /// Where the model's metadata may be read, in order: the node's model
    /// file, then its fetched shard.
    pub metadata: Vec<PathBuf>,
}

impl ClusterSide {
    /// The serving figures of this node and of the peers that sent theirs
    /// recently.
    pub fn node_stats(&self) -> Vec<PeerStats> {
        self.status
            .borrow()
            .as_ref()
            .map(|s| s.stats.clone())
            .unwrap_or_default()
    }

    /// The committed plan's epoch, when it has windows.
    pub fn active_epoch(&self) -> Option<u64> {
        let st = self.status.borrow();
        let st = st.as_ref()?;
        let plan = st.plan.as_ref()?;
        (plan.epoch > 0 && plan.note.is_none() && !plan.ring.is_empty()).then_some(plan.epoch)
    }
}

/// The HTTP API of a `loip run` node: its settings, and where the model's
/// metadata may be read.
pub struct ClusterHttp {
    pub config: ServeConfig,
    pub metadata: Vec<PathBuf>,
}

/// Sequences one node sends to the cluster at once; more wait in the queue.
pub const MAX_IN_FLIGHT: usize = 16;

/// The HTTP settings of a node, when `--http` (or `http =`) asks for it.
pub fn http_config(cfg: &RunConfig) -> Option<ClusterHttp> {
    let addr = cfg.http?;
    let shard = cfg.data_dir.join(SHARD_FILE);
    let metadata: Vec<PathBuf> = cfg.model.iter().cloned().chain([shard]).collect();
    Some(ClusterHttp {
        config: ServeConfig {
            model: metadata[0].clone(),
            addr,
            api_key: cfg.api_key.clone(),
            max_batch: MAX_IN_FLIGHT,
            queue: None,
            context: None,
            threads: 1,
            memory: None,
            adapt: false,
            data_dir: Some(cfg.data_dir.clone()),
            template: TemplateChoice::Auto,
            limits: Limits::default(),
            mdns: cfg.mdns,
        },
        metadata,
    })
}

/// Starts the HTTP API of `node` on the current tokio runtime; a failure
/// to bind or serve is logged, and the node goes on without it.
pub fn spawn(
    http: ClusterHttp,
    node: Running,
    on_listening: impl FnOnce(SocketAddr) + Send + 'static,
) {
    let side = ClusterSide {
        client: node.client,
        status: node.status,
        metadata: http.metadata,
    };
    tokio::spawn(async move {
        if let Err(e) = super::http::serve(
            Arc::new(http.config),
            super::http::Backend::Cluster(Box::new(side)),
            on_listening,
        )
        .await
        {
            log::error!("the HTTP API stopped: {e}");
        }
    });
}

/// How often the dispatcher looks for the model's metadata until it has it.
const METADATA_POLL: Duration = Duration::from_millis(500);

/// Loads the tokenizer and template, then takes requests off the queue
/// for as long as the queue lives. Runs on its own thread.
pub fn dispatch(
    state: Arc<AppState>,
    jobs: std::sync::mpsc::Receiver<Job>,
    side: ClusterSide,
    rt: tokio::runtime::Handle,
) {
    let loaded = loop {
        match load(&state, &side) {
            Ok(l) => break l,
            Err(e) => {
                log::debug!("cluster HTTP: model metadata not available yet: {e}");
                std::thread::sleep(METADATA_POLL);
            }
        }
    };
    let _ = state.loaded.set(loaded.clone());
    log::info!("cluster HTTP: tokenizer loaded; serving once a plan is active");
    let running = Arc::new(Semaphore::new(state.config.max_batch));
    let rate = Arc::new(std::sync::Mutex::new(Rate::new()));
    for job in jobs {
        state.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        let permit = match rt.block_on(running.clone().acquire_owned()) {
            Ok(p) => p,
            Err(_) => return,
        };
        let (state, side, loaded, rate) =
            (state.clone(), side.clone(), loaded.clone(), rate.clone());
        rt.spawn(async move {
            state.metrics.active.fetch_add(1, Ordering::Relaxed);
            run_job(&state, &side, &loaded, &rate, job).await;
            state.metrics.active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

fn load(state: &AppState, side: &ClusterSide) -> Result<Arc<Loaded>, ServeError> {
    let mut last = ServeError::NotReady;
    for path in &side.metadata {
        if !path.is_file() {
            continue;
        }
        let r = (|| {
            let gguf = Gguf::open(path).map_err(crate::engine::EngineError::from)?;
            let tokenizer = Arc::new(Tokenizer::from_gguf(gguf.metadata())?);
            let template =
                ChatTemplate::for_model(gguf.metadata(), &tokenizer, state.config.template)?;
            let c = crate::model::config::Config::from_gguf(&gguf)
                .map_err(crate::engine::EngineError::from)?;
            let context = state.config.context.unwrap_or(c.context_length);
            if context > c.context_length {
                return Err(ServeError::ContextTooLong {
                    asked: context,
                    model: c.context_length,
                });
            }
            Ok(Arc::new(Loaded::new(
                tokenizer, template, context, c.n_layer,
            )))
        })();
        match r {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One request: tokens from the cluster, text to the client.
async fn run_job(
    state: &AppState,
    side: &ClusterSide,
    loaded: &Loaded,
    rate: &std::sync::Mutex<Rate>,
    job: Job,
) {
    let metrics = &state.metrics;
    let params = &job.params;
    let mut stop: Vec<u32> = loaded.tokenizer.eog_ids().to_vec();
    stop.extend_from_slice(&params.stop_tokens);
    let max_tokens = params
        .max_tokens
        .unwrap_or(loaded.context - job.prompt.len());
    let req = GenerateRequest {
        prompt: job.prompt.clone(),
        max_tokens,
        stop: Some(stop),
        sampling: Sampling {
            temperature: params.temperature,
            top_p: Some(params.top_p),
            seed: params.seed,
        },
    };
    let mut generation = side.client.generate(req);
    let mut stream = TextStream::new(&loaded.tokenizer, params);
    let mut tokens = 0usize;
    let mut last: Option<Instant> = None;
    let stall = state.config.limits.sse_stall;
    let send = |event: Event| {
        let events = job.events.clone();
        async move {
            match tokio::time::timeout(stall, events.send(event)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err("the client went away"),
                Err(_) => Err("the client took nothing for the stall timeout"),
            }
        }
    };
    while let Some(event) = generation.next().await {
        match event {
            client::Event::Token(id) => {
                let now = Instant::now();
                match last {
                    None => metrics
                        .ttft
                        .observe(now.duration_since(job.arrived).as_secs_f64()),
                    Some(t) => metrics
                        .inter_token
                        .observe(now.duration_since(t).as_secs_f64()),
                }
                last = Some(now);
                tokens += 1;
                metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                let r = rate
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(now, 1);
                metrics.tokens_per_s.set(r);
                let step = stream.push(id);
                let (text, finish) = (step.text.to_string(), step.finish);
                if !text.is_empty() {
                    if let Err(why) = send(Event::Text(text)).await {
                        log::debug!("request dropped: {why}");
                        metrics.request(Outcome::Cancelled);
                        return; // dropping `generation` cancels it
                    }
                }
                if let Some(finish) = finish {
                    let _ = send(Event::Done {
                        finish,
                        usage: Usage::new(job.prompt.len(), tokens),
                    })
                    .await;
                    metrics.request(Outcome::Ok);
                    return;
                }
            }
            client::Event::Finished(Ok(_)) => {
                // The ring ended it (max_tokens, or a stop token the
                // stream already reported): whatever is held back goes out.
                let rest = stream.finish().to_string();
                if !rest.is_empty() && send(Event::Text(rest)).await.is_err() {
                    metrics.request(Outcome::Cancelled);
                    return;
                }
                let finish = stream.finish_reason().unwrap_or(FinishReason::MaxTokens);
                let _ = send(Event::Done {
                    finish,
                    usage: Usage::new(job.prompt.len(), tokens),
                })
                .await;
                metrics.request(Outcome::Ok);
                return;
            }
            client::Event::Finished(Err(e)) => {
                metrics.request(Outcome::Failed);
                let refusal = match e {
                    ClientError::Request(m) => ServeError::Refused(m),
                    ClientError::NoPlan(m) => ServeError::ClusterUnavailable(m),
                    e => ServeError::Generation(e.to_string()),
                };
                let _ = send(Event::Refused(refusal)).await;
                return;
            }
        }
    }
}

/// `/v1/cluster` on a cluster node: the members in ring order with their
/// windows, the leader, this node's links (as the leader measured them),
/// and this node's serving figures.
pub fn view(state: &AppState, side: &ClusterSide) -> serde_json::Value {
    let m = &state.metrics;
    let st = side.status.borrow();
    let Some(st) = st.as_ref() else {
        return serde_json::json!({"leader": null, "plan_epoch": 0, "nodes": [], "links": []});
    };
    let ms = &st.membership;
    let live: std::collections::BTreeMap<_, _> = ms.peers.iter().copied().collect();
    let plan = st.plan.as_ref();
    let n_units = plan.map_or(0, |p| p.n_units);
    let nodes: Vec<serde_json::Value> = match plan {
        Some(p) => p
            .ring
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let windows: Vec<serde_json::Value> = p
                    .ring_windows
                    .get(i)
                    .map(|ws| {
                        ws.iter()
                            .map(|w| {
                                // Plan units are whole layers, then the head.
                                let name = |u: u32| {
                                    if u + 1 == n_units {
                                        "head".to_string()
                                    } else {
                                        format!("layer.{u}")
                                    }
                                };
                                let (mut resident, mut streamed) = (Vec::new(), Vec::new());
                                for (u, &s) in w.units.clone().zip(&w.streamed) {
                                    if s { &mut streamed } else { &mut resident }.push(name(u));
                                }
                                serde_json::json!({
                                    "index": w.index,
                                    "first_layer": w.units.start,
                                    "last_layer": w.units.end.saturating_sub(1),
                                    "head": w.units.end == n_units,
                                    "resident": resident,
                                    "streamed": streamed,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let me = id == st.id;
                let address = if me {
                    Some(st.listen)
                } else {
                    st.connected.iter().find(|(p, _)| *p == id).map(|(_, a)| *a)
                };
                // Figures of this node's own HTTP traffic; the others' are
                // on their own pages.
                let own = |v: serde_json::Value| if me { v } else { serde_json::Value::Null };
                let mut node = serde_json::json!({
                    "id": id.to_string(),
                    "address": address.map(|a| a.to_string()),
                    "role": if ms.leader == Some(id) { "leader" } else { "follower" },
                    "this_node": me,
                    "alive": me || live.get(&id).copied().unwrap_or(false),
                    "windows": windows,
                    "http_tokens_per_s": own(m.tokens_per_s.get().into()),
                    "active_sequences": own(m.active.load(Ordering::Relaxed).into()),
                    "queue_depth": own(m.queue_depth.load(Ordering::Relaxed).into()),
                });
                let figures = st.stats.iter().find(|p| p.id == id);
                if let (Some(obj), fields) = (node.as_object_mut(), node_figures(figures)) {
                    obj.extend(fields);
                }
                node
            })
            .collect(),
        None => Vec::new(),
    };
    let links: Vec<serde_json::Value> = st
        .links
        .iter()
        .map(|l| {
            serde_json::json!({
                "peer": l.peer.to_string(),
                "bandwidth_bps": l.bandwidth_bps,
                "latency_s": l.latency_s,
                "age_s": l.age_s,
            })
        })
        .collect();
    serde_json::json!({
        "leader": ms.leader.map(|l| l.to_string()),
        "cluster": true,
        "term": ms.term,
        "plan_epoch": side.active_epoch().unwrap_or(0),
        "model": state.config.model_name(),
        "note": plan.and_then(|p| p.note.clone()),
        "this_node": st.id.to_string(),
        "nodes": nodes,
        "links": links,
        "active_sequences": m.active.load(Ordering::Relaxed),
        "queue_depth": m.queue_depth.load(Ordering::Relaxed),
        "tokens_per_s": m.tokens_per_s.get(),
    })
}

/// A member's memory and link figures in `/v1/cluster`, from what it
/// gossiped: null when none came recently (it left, or has not sent yet).
fn node_figures(p: Option<&PeerStats>) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::{json, Value};
    let fields = match p {
        None => json!({
            "tokens_per_s": Value::Null,
            "kv_bytes": Value::Null,
            "loading_bubbles": Value::Null,
            "loading_bubble_seconds": Value::Null,
            "backlog_ms": Value::Null,
            "memory": Value::Null,
            "kv_pressure": Value::Null,
            "link_bytes": Value::Null,
            "ring_epoch": Value::Null,
            "ring_tokens": Value::Null,
            "stats_age_s": Value::Null,
        }),
        Some(p) => {
            let s = &p.stats;
            json!({
                "tokens_per_s": s.tokens_per_s,
                "kv_bytes": s.kv_used_bytes,
                "loading_bubbles": s.bubbles,
                "loading_bubble_seconds": s.bubble_seconds,
                "backlog_ms": s.backlog_ms,
                "memory": {
                    "budget": s.budget_bytes,
                    "weights_and_slots": s.weights_bytes,
                    "kv_used": s.kv_used_bytes,
                    "kv_capacity": s.kv_capacity_bytes,
                    "kv_budget": s.kv_budget_bytes,
                },
                "kv_pressure": {
                    "demotions": s.demotions,
                    "promotions": s.promotions,
                    "demoted_units": s.demoted_units,
                    "kv_positions": s.kv_positions,
                    "waiting": s.kv_waiting,
                    "waited": s.kv_waited,
                },
                "link_bytes": s.links.iter()
                    .map(|(to, b)| json!({"to": to.to_string(), "bytes": b}))
                    .collect::<Vec<_>>(),
                "ring_epoch": s.epoch,
                "ring_tokens": s.tokens,
                "stats_age_s": p.age_s,
            })
        }
    };
    match fields {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}
