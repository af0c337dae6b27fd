//! The routes, their limits, the API key, and the one place where a
//! [`ServeError`] becomes a status and OpenAI's error shape.
//!
//! Limits, outermost first:
//! - hyper closes a connection whose request headers do not arrive within
//!   [`Limits::header_timeout`] (slowloris, and idle keep-alives), and
//!   answers 431 past 100 headers or 64 KiB of them;
//! - [`limit_body`], on every route: a declared `Content-Length` over
//!   [`Limits::body_bytes`] is 413 at once, and any body is cut off at that
//!   size while it is read (413 as well);
//! - on all routes but `/health` and the page: the API key, then a cap on
//!   requests handled at once (429 past it);
//! - completion requests then go through the scheduler's bounded queue
//!   (429 with `Retry-After` when full).
//!
//! # Cancel safety
//!
//! A handler future is dropped when its client disconnects; it holds the
//! receiving end of its request's event channel, so dropping it is what
//! tells the compute thread to drop the sequence. Nothing else needs
//! cleaning up.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::api::{self, ChatRequest, Checked, CompletionRequest, Endpoint};
use super::cluster::ClusterSide;
use super::metrics::{Metrics, Outcome};
use super::scheduler::{
    self, AdaptState, Adaptation, Event, Job, LoopConfig, Queue, EVENT_CAPACITY,
};
use super::{node_id, page, ServeConfig, ServeError};
use crate::engine::adapt::{Limits, Policy, Rates};
use crate::engine::kv::KvCache;
use crate::engine::offload::{
    fixed_bytes, open_adaptive, open_engine, Budget, Demand, LoadMode, OffloadSpec, Placement,
};
use crate::engine::weights::Unit;
use crate::model::chat::ChatTemplate;
use crate::model::gguf::Gguf;
use crate::model::tokenizer::Tokenizer;
use crate::store::{Store, Tree};

impl ServeError {
    fn status(&self) -> StatusCode {
        use ServeError::*;
        match self {
            BadJson(_)
            | InvalidParam { .. }
            | ContextExceeded { .. }
            | MemoryExceeded { .. }
            | EmptyPrompt
            | Template(_)
            | Refused(_)
            | Tokenizer(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Unauthorized => StatusCode::UNAUTHORIZED,
            QueueFull { .. } | Busy => StatusCode::TOO_MANY_REQUESTS,
            NotReady | ClusterUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            NotFound(_) => StatusCode::NOT_FOUND,
            Generation(_) | Load(_) | Io(_) | ContextTooLong { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// OpenAI's `type` and `code`.
    fn kind(&self) -> (&'static str, Option<&'static str>) {
        use ServeError::*;
        match self {
            ContextExceeded { .. } | MemoryExceeded { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            QueueFull { .. } | Busy => ("rate_limit_error", Some("queue_full")),
            NotReady | ClusterUnavailable(_) => ("service_unavailable", Some("not_ready")),
            NotFound(_) => ("invalid_request_error", Some("not_found")),
            Generation(_) | Load(_) | Io(_) | ContextTooLong { .. } => ("server_error", None),
            _ => ("invalid_request_error", None),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ServeError::InvalidParam { param, .. } => Some(param),
            ServeError::ContextExceeded { .. } | ServeError::MemoryExceeded { .. } => {
                Some("max_tokens")
            }
            _ => None,
        }
    }

    /// The error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        json!({"error": {
            "message": self.to_string(), "type": kind, "param": self.param(), "code": code,
        }})
    }
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), Json(self.body())).into_response();
        if matches!(
            self,
            ServeError::QueueFull { .. } | ServeError::Busy | ServeError::NotReady
        ) {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// What exists once the model is loaded.
pub struct Loaded {
    pub(super) tokenizer: Arc<Tokenizer>,
    template: ChatTemplate,
    pub(super) context: usize,
    n_layer: usize,
    placement: Option<Placement>,
    /// Under adaptation: tokens one sequence's KV may hold in the budget.
    sequence_limit: Option<usize>,
}

impl Loaded {
    /// What a cluster node has once it read the model's metadata: every
    /// weight is with the ring.
    pub(super) fn new(
        tokenizer: Arc<Tokenizer>,
        template: ChatTemplate,
        context: usize,
        n_layer: usize,
    ) -> Loaded {
        Loaded {
            tokenizer,
            template,
            context,
            n_layer,
            placement: None,
            sequence_limit: None,
        }
    }
}

/// Who generates the answers.
pub enum Backend {
    /// This process's engine, on its compute thread (`loip serve`).
    Local,
    /// The cluster this node is a member of (`loip run --http`).
    Cluster(Box<ClusterSide>),
}

pub struct AppState {
    pub(super) config: Arc<ServeConfig>,
    pub(super) metrics: Arc<Metrics>,
    queue: Queue,
    pub(super) loaded: OnceLock<Arc<Loaded>>,
    limiter: Arc<Semaphore>,
    next_id: AtomicU64,
    started: Instant,
    node: String,
    addr: SocketAddr,
    cluster: Option<ClusterSide>,
}

impl AppState {
    fn loaded(&self) -> Result<Arc<Loaded>, ServeError> {
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| c.active_epoch().is_none())
        {
            return Err(ServeError::NotReady);
        }
        self.loaded.get().cloned().ok_or(ServeError::NotReady)
    }

    /// Ready for requests: the model loaded and, on a cluster, a plan with
    /// windows committed.
    fn ready(&self) -> bool {
        self.loaded().is_ok()
    }

    /// The plan epoch requests run under.
    fn plan_epoch(&self) -> u64 {
        match &self.cluster {
            Some(c) => c.active_epoch().unwrap_or(0),
            None => self.metrics.plan_epoch.load(Ordering::Relaxed),
        }
    }
}

/// Binds, starts the compute thread and serves until an error.
pub async fn serve(
    config: Arc<ServeConfig>,
    backend: Backend,
    on_listening: impl FnOnce(SocketAddr) + Send + 'static,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    let node = node_id();
    let metrics = Arc::new(Metrics::new(node.clone()));
    let (queue, jobs) = Queue::new(config.queue_depth(), metrics.clone());
    let state = Arc::new(AppState {
        metrics,
        queue,
        loaded: OnceLock::new(),
        limiter: Arc::new(Semaphore::new(config.limits.concurrent_requests)),
        next_id: AtomicU64::new(1),
        started: Instant::now(),
        node,
        addr,
        config: config.clone(),
        cluster: match &backend {
            Backend::Local => None,
            Backend::Cluster(side) => Some((**side).clone()),
        },
    });
    on_listening(addr);
    let _announcer = if config.mdns && !addr.ip().is_loopback() {
        super::discovery::announce(
            &state.node,
            addr,
            &config.model_name(),
            config.api_key.is_some(),
        )
        .map_err(|e| log::warn!("mDNS announcement failed (serving anyway): {e}"))
        .ok()
    } else {
        None
    };
    let (failed_tx, failed_rx) = oneshot::channel();
    let compute_state = state.clone();
    match backend {
        Backend::Local => {
            std::thread::Builder::new()
                .name("loip-compute".into())
                .spawn(move || {
                    if let Err(e) = compute_main(&compute_state, jobs) {
                        let _ = failed_tx.send(e);
                    }
                })?;
        }
        Backend::Cluster(side) => {
            let rt = tokio::runtime::Handle::current();
            std::thread::Builder::new()
                .name("loip-dispatch".into())
                .spawn(move || super::cluster::dispatch(compute_state, jobs, *side, rt))?;
            drop(failed_tx);
        }
    }
    let app = router(state);
    tokio::select! {
        r = accept_loop(listener, app, config.limits.header_timeout) => r,
        Ok(e) = failed_rx => Err(e),
    }
}

/// The compute thread: loads the model, marks the node ready, then runs the
/// scheduler for good.
fn compute_main(state: &AppState, jobs: std::sync::mpsc::Receiver<Job>) -> Result<(), ServeError> {
    let config = &state.config;
    let path = &config.model;
    let gguf = Gguf::open(path).map_err(crate::engine::EngineError::from)?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(gguf.metadata())?);
    let template = ChatTemplate::for_model(gguf.metadata(), &tokenizer, config.template)?;
    let model_context = crate::model::config::Config::from_gguf(&gguf)
        .map_err(crate::engine::EngineError::from)?
        .context_length;
    drop(gguf);
    let context = config.context.unwrap_or(model_context);
    if context > model_context {
        return Err(ServeError::ContextTooLong {
            asked: context,
            model: model_context,
        });
    }
    let batch = config.max_batch;
    let adaptive = config.adapt
        && config
            .memory
            .is_some_and(|(_, mode, _)| mode != LoadMode::Mapped);
    let (mut engine, placement, mut adaptation) = match config.memory {
        Some((budget, mode, slots)) if adaptive => {
            let (engine, placement, adaptation) =
                open_adaptive_serving(config, budget, mode, slots, context)?;
            (engine, Some(placement), Some(adaptation))
        }
        memory => {
            // The budget holds the KV cache of a full batch of full
            // sequences, so no sequence can outgrow it.
            let (engine, placement) = open_engine(path, config.threads, memory, |slots| Demand {
                batch,
                positions: context,
                slots,
            })?;
            (engine, placement, None)
        }
    };
    let c = &engine.model().config;
    let sequence_limit = adaptation.as_ref().map(|a| {
        let grown = a.policy.kv_capacity() / (a.kv_per_position * a.kv_grow as u64).max(1);
        (grown as usize * a.kv_grow).min(context)
    });
    let loaded = Arc::new(Loaded {
        tokenizer: tokenizer.clone(),
        template,
        context,
        n_layer: c.n_layer,
        placement,
        sequence_limit,
    });
    let _ = state.loaded.set(loaded);
    state.metrics.plan_epoch.store(1, Ordering::Relaxed);
    log::info!("model loaded; serving");
    let loop_config = LoopConfig {
        max_batch: config.max_batch,
        context,
        sse_stall: config.limits.sse_stall,
    };
    scheduler::run(
        &mut engine,
        &tokenizer,
        jobs,
        &loop_config,
        &state.metrics,
        adaptation.as_mut(),
    );
    Ok(())
}

/// Opens the engine for online adaptation: the placement leaves a margin
/// for the first sequences' KV, the demotions saved in the node's database
/// (if any) are streamed from the start, and the policy is set up over the
/// same accounting.
fn open_adaptive_serving(
    config: &ServeConfig,
    budget: Budget,
    mode: LoadMode,
    slots: usize,
    context: usize,
) -> Result<(crate::engine::generate::Engine, Placement, Adaptation), ServeError> {
    let gguf = Gguf::open(&config.model).map_err(crate::engine::EngineError::from)?;
    let c =
        crate::model::config::Config::from_gguf(&gguf).map_err(crate::engine::EngineError::from)?;
    let model_bytes: u64 = gguf.tensors().iter().map(|t| t.size).sum();
    drop(gguf);
    let budget_bytes = budget.bytes(model_bytes);
    let kv_per_position = KvCache::bytes_per_position(c.n_layer, c.kv_dim()) as u64;
    let kv_grow = crate::engine::kv::GROW;
    let chunk = kv_per_position * kv_grow as u64;
    // Promote only with this much free: a sixteenth of the budget, and at
    // least two growth steps of a cache, so that a cache that grows right
    // after a promotion does not demote it again at once.
    let margin = (budget_bytes / 16).max(2 * chunk);
    let model_name = config.model_name();
    let store = match Store::open(
        config
            .data_dir
            .clone()
            .unwrap_or_else(crate::store::default_dir),
    ) {
        Ok(s) => Some(s),
        Err(e) => {
            log::warn!("adaptation state will not be kept: {e}");
            None
        }
    };
    let key = Adaptation::key(&model_name);
    let saved: Vec<Unit> = store
        .as_ref()
        .and_then(|s| match s.get_json::<AdaptState>(Tree::Adapt, &key) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("ignoring the saved adaptation state: {e}");
                None
            }
        })
        .filter(|st| st.model == model_name && st.n_layer == c.n_layer)
        .map(|st| {
            st.streamed
                .iter()
                .filter_map(|n| Unit::parse(n).filter(|u| u.layer() < c.n_layer))
                .collect()
        })
        .unwrap_or_default();
    if !saved.is_empty() {
        log::info!("resuming with {} unit(s) streamed, as saved", saved.len());
    }
    let demand = Demand {
        batch: config.max_batch,
        positions: context,
        slots,
    };
    let spec = OffloadSpec {
        budget: Budget::Bytes(budget_bytes),
        demand,
        threads: config.threads,
        mode,
    };
    let (engine, placement) = open_adaptive(&config.model, &spec, margin, &saved)?;
    let (scratch, vectors) = fixed_bytes(engine.model(), demand, config.threads);
    let limits = Limits {
        budget: budget_bytes,
        slots,
        fixed: scratch + vectors,
        margin,
        max_kv_per_sequence: (context.div_ceil(kv_grow) * kv_grow) as u64 * kv_per_position,
    };
    // Decode reads the weights at about 20 GB/s on the CPUs we measured
    // (DESIGN.md §8); only the ratio to storage bandwidth ranks units.
    let costs = Policy::costs_of(engine.model(), 20e9);
    let policy = Policy::new(costs, &placement.streamed, limits, Rates::default());
    let adaptation = Adaptation {
        policy,
        kv_per_position,
        kv_grow,
        store: store.map(|s| (s, key)),
        model: model_name,
        n_layer: c.n_layer,
    };
    Ok((engine, placement, adaptation))
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    header_timeout: std::time::Duration,
) -> Result<(), ServeError> {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, say: wait, never spin or stop.
                log::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024);
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .route("/health", get(health))
        .route("/", get(page::page))
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), limit_body))
        .with_state(state)
}

async fn limit_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let limit = state.config.limits.body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ServeError::BodyTooLarge { limit }.into_response();
    }
    let (parts, body) = req.into_parts();
    let body = Body::new(http_body_util::Limited::new(body, limit));
    next.run(Request::from_parts(parts, body)).await
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            return ServeError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

async fn limit_concurrency(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = state.limiter.clone().try_acquire_owned() else {
        return ServeError::Busy.into_response();
    };
    next.run(req).await
}

async fn not_found(req: Request) -> Response {
    ServeError::NotFound(format!("{} {}", req.method(), req.uri().path())).into_response()
}

/// Reads a body within the limit.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ServeError> {
    axum::body::to_bytes(body, usize::MAX).await.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return ServeError::BodyTooLarge { limit };
            }
            source = s.source();
        }
        ServeError::BadJson(format!("reading the body: {e}"))
    })
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let body = |status: &str| {
        json!({
            "status": status,
            "node": state.node,
            "model": state.config.model_name(),
            "plan_epoch": state.plan_epoch(),
            "uptime_s": state.started.elapsed().as_secs_f64(),
            "active_sequences": m.active.load(Ordering::Relaxed),
            "queue_depth": m.queue_depth.load(Ordering::Relaxed),
        })
    };
    if state.ready() {
        Json(body("ok")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body("loading"))).into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = match &state.cluster {
        // On a cluster node the epoch is the committed plan's, and the
        // per-node series are every member's gossiped figures.
        Some(side) => {
            state
                .metrics
                .plan_epoch
                .store(state.plan_epoch(), Ordering::Relaxed);
            let nodes = side.node_stats();
            state
                .metrics
                .render_cluster(&nodes, &|id: crate::net::NodeId| id.to_string())
        }
        None => state.metrics.render(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let context = state.loaded.get().map(|l| l.context);
    Json(json!({"object": "list", "data": [{
        "id": state.config.model_name(), "object": "model", "created": unix_now(),
        "owned_by": "loip", "context_length": context,
    }]}))
    .into_response()
}

fn unit_name(u: Unit) -> String {
    match u {
        Unit::Attn(l) => format!("attn.{l}"),
        Unit::Mlp(l) => format!("mlp.{l}"),
        Unit::Head => "head".into(),
    }
}

/// Adaptation counters for `/v1/cluster` (null without adaptation).
fn l_adapt(state: &AppState) -> serde_json::Value {
    let m = &state.metrics;
    let on = m
        .streamed_units
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some();
    if !on {
        return serde_json::Value::Null;
    }
    json!({
        "demotions": m.demotions.load(Ordering::Relaxed),
        "promotions": m.promotions.load(Ordering::Relaxed),
        "resident_units": m.resident_units.load(Ordering::Relaxed),
        "budget_bytes": m.budget_bytes.load(Ordering::Relaxed),
        "weights_slots_scratch_bytes": m.weights_bytes.load(Ordering::Relaxed),
        "sequence_limit": state.loaded.get().and_then(|l| l.sequence_limit),
    })
}

async fn cluster(State(state): State<Arc<AppState>>) -> Response {
    if let Some(side) = &state.cluster {
        return Json(super::cluster::view(&state, side)).into_response();
    }
    let m = &state.metrics;
    let loaded = state.loaded.get();
    let window = loaded.map(|l| {
        let now = m
            .streamed_units
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (resident, streamed): (Vec<String>, Vec<String>) = match (&l.placement, now) {
            (_, Some(streamed)) => (
                Unit::all(l.n_layer)
                    .into_iter()
                    .filter(|u| !streamed.contains(u))
                    .map(unit_name)
                    .collect(),
                streamed.into_iter().map(unit_name).collect(),
            ),
            (Some(p), None) => (
                p.resident.iter().map(|&u| unit_name(u)).collect(),
                p.streamed.iter().map(|&u| unit_name(u)).collect(),
            ),
            (None, None) => (
                Unit::all(l.n_layer).into_iter().map(unit_name).collect(),
                Vec::new(),
            ),
        };
        json!({"first_layer": 0, "last_layer": l.n_layer.saturating_sub(1),
               "resident": resident, "streamed": streamed})
    });
    let memory = loaded
        .and_then(|l| l.placement.as_ref())
        .map(|p| serde_json::to_value(p.accounting).unwrap_or_default());
    Json(json!({
        "leader": state.node,
        "plan_epoch": m.plan_epoch.load(Ordering::Relaxed),
        "model": state.config.model_name(),
        "nodes": [{
            "id": state.node,
            "address": state.addr.to_string(),
            "role": "leader",
            "ready": loaded.is_some(),
            "windows": window.into_iter().collect::<Vec<_>>(),
            "memory": memory,
            "kv_bytes": m.kv_bytes.load(Ordering::Relaxed),
            "tokens_per_s": m.tokens_per_s.get(),
            "active_sequences": m.active.load(Ordering::Relaxed),
            "queue_depth": m.queue_depth.load(Ordering::Relaxed),
            "loading_bubbles": m.bubbles.load(Ordering::Relaxed),
            "adaptation": l_adapt(&state),
        }],
        "links": [],
    }))
    .into_response()
}

async fn chat(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let r = async {
        let body = read_body(req.into_body(), state.config.limits.body_bytes).await?;
        let request: ChatRequest = api::parse(&body)?;
        let checked = request.common.check()?;
        let messages = request.chat()?;
        let loaded = state.loaded()?;
        let l = loaded.clone();
        let prompt = tokio::task::spawn_blocking(move || -> Result<Vec<u32>, ServeError> {
            let text = l.template.render(&messages, true)?;
            Ok(l.tokenizer.encode_prompt(&text)?)
        })
        .await
        .map_err(|e| ServeError::Generation(e.to_string()))??;
        Ok::<_, ServeError>((prompt, checked, loaded))
    }
    .await;
    respond(&state, Endpoint::Chat, r).await
}

async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let r = async {
        let body = read_body(req.into_body(), state.config.limits.body_bytes).await?;
        let request: CompletionRequest = api::parse(&body)?;
        let checked = request.common.check()?;
        let text = request.text()?.to_string();
        let loaded = state.loaded()?;
        let l = loaded.clone();
        let prompt = tokio::task::spawn_blocking(move || l.tokenizer.encode_prompt(&text))
            .await
            .map_err(|e| ServeError::Generation(e.to_string()))??;
        Ok::<_, ServeError>((prompt, checked, loaded))
    }
    .await;
    respond(&state, Endpoint::Completions, r).await
}

/// Queues a checked request and answers it, whole or streamed.
async fn respond(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    prepared: Result<(Vec<u32>, Checked, Arc<Loaded>), ServeError>,
) -> Response {
    let arrived = Instant::now();
    let (rx, checked) = match submit(state, prepared, arrived) {
        Ok(x) => x,
        Err(e) => {
            state.metrics.request(match e {
                ServeError::QueueFull { .. } => Outcome::QueueFull,
                _ => Outcome::Invalid,
            });
            return e.into_response();
        }
    };
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let reply = Reply {
        endpoint,
        id: format!("{prefix}-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        model: state.config.model_name(),
    };
    if checked.stream {
        stream(reply, rx, checked.include_usage).into_response()
    } else {
        whole(reply, rx).await
    }
}

fn submit(
    state: &AppState,
    prepared: Result<(Vec<u32>, Checked, Arc<Loaded>), ServeError>,
    arrived: Instant,
) -> Result<(mpsc::Receiver<Event>, Checked), ServeError> {
    let (prompt, checked, loaded) = prepared?;
    if prompt.is_empty() {
        return Err(ServeError::EmptyPrompt);
    }
    if prompt.len().saturating_add(checked.max_tokens) > loaded.context {
        return Err(ServeError::ContextExceeded {
            prompt: prompt.len(),
            max_tokens: checked.max_tokens,
            limit: loaded.context,
        });
    }
    if let Some(limit) = loaded.sequence_limit {
        if prompt.len().saturating_add(checked.max_tokens) > limit {
            return Err(ServeError::MemoryExceeded {
                prompt: prompt.len(),
                max_tokens: checked.max_tokens,
                limit,
            });
        }
    }
    let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
    state.queue.submit(Job {
        prompt,
        params: checked.params.clone(),
        events: tx,
        arrived,
    })?;
    Ok((rx, checked))
}

struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
}

async fn whole(reply: Reply, mut rx: mpsc::Receiver<Event>) -> Response {
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done { finish, usage } => {
                let body = api::full_response(
                    reply.endpoint,
                    &reply.id,
                    reply.created,
                    &reply.model,
                    &text,
                    api::finish_name(finish),
                    usage,
                );
                return Json(body).into_response();
            }
            Event::Failed(m) => return ServeError::Generation(m).into_response(),
            Event::Refused(e) => return e.into_response(),
        }
    }
    ServeError::Generation("the compute thread dropped the request".into()).into_response()
}

/// The SSE stream: a role chunk (chat), text chunks, the finish chunk, a
/// usage chunk when asked for, then `[DONE]`.
fn stream(
    reply: Reply,
    rx: mpsc::Receiver<Event>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        reply: Reply,
        rx: mpsc::Receiver<Event>,
        out: VecDeque<String>,
        ended: bool,
        include_usage: bool,
    }
    let mut out = VecDeque::new();
    if reply.endpoint == Endpoint::Chat {
        let c = api::chunk(
            reply.endpoint,
            &reply.id,
            reply.created,
            &reply.model,
            Some(""),
            None,
            true,
        );
        out.push_back(c.to_string());
    }
    let st = St {
        reply,
        rx,
        out,
        ended: false,
        include_usage,
    };
    let s = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(frame) = st.out.pop_front() {
                return Some((Ok(SseEvent::default().data(frame)), st));
            }
            if st.ended {
                return None;
            }
            let r = &st.reply;
            let (e, id, cr, m) = (r.endpoint, r.id.as_str(), r.created, r.model.as_str());
            match st.rx.recv().await {
                Some(Event::Text(t)) => {
                    st.out
                        .push_back(api::chunk(e, id, cr, m, Some(&t), None, false).to_string());
                }
                Some(Event::Done { finish, usage }) => {
                    let f = api::finish_name(finish);
                    st.out
                        .push_back(api::chunk(e, id, cr, m, None, Some(f), false).to_string());
                    if st.include_usage {
                        st.out
                            .push_back(api::usage_chunk(e, id, cr, m, usage).to_string());
                    }
                    st.out.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(Event::Failed(msg)) => {
                    st.out
                        .push_back(ServeError::Generation(msg).body().to_string());
                    st.out.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(Event::Refused(err)) => {
                    st.out.push_back(err.body().to_string());
                    st.out.push_back("[DONE]".into());
                    st.ended = true;
                }
                None => st.ended = true,
            }
        }
    });
    Sse::new(s)
}
