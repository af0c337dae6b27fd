//! `loip demo`: a ring of N node processes on loopback, with a plan that
//! streams half of every window's layers (offloading on every node), and a
//! chat with it.
//!
//! The parent writes a directory with a CA, one identity per node and
//! `demo.json` (the plan, every node's id and address, the model), runs
//! node 0 (the head) itself and starts the others as `loip demo-node`
//! children, which exit when their standard input closes, so they never
//! outlive the parent.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::emulation::Emulation;
use super::{Peer, RingConfig, RingError, RingNode, RingRequest};
use crate::model::chat::{ChatMessage, ChatTemplate, Role, TemplateChoice};
use crate::model::gguf::Gguf;
use crate::model::tokenizer::Tokenizer;
use crate::net::emulated::LinkEmulation;
use crate::net::identity::{create_ca, create_node, NodeIdentity};
use crate::net::quic::{Endpoint, Limits};
use crate::net::NodeId;
use crate::plan::{Loading, Plan, Planner, Window};

/// What every demo node reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DemoFile {
    pub plan: Plan,
    /// Node ids and addresses, in ring order.
    pub nodes: Vec<(u64, SocketAddr)>,
    pub model: PathBuf,
    /// Per node, in ring order: emulated storage and compute (benchmarks;
    /// absent: none).
    #[serde(default)]
    pub emulation: Vec<Emulation>,
    /// Per node: its emulated outgoing link to every other node, as
    /// `100mbit/2ms` (absent: loopback as it is).
    #[serde(default)]
    pub links: Vec<Option<String>>,
}

fn err(what: &str, e: impl std::fmt::Display) -> RingError {
    RingError::Plan(format!("{what}: {e}"))
}

/// A plan of two rounds over `nodes` devices: `2 × nodes` windows of near
/// equal size, every other layer of each streamed; the head resident.
pub fn demo_plan(n_layer: usize, nodes: usize) -> Result<Plan, RingError> {
    let n_win = 2 * nodes;
    if nodes == 0 || n_win > n_layer {
        return Err(RingError::Plan(format!(
            "{nodes} nodes: a model of {n_layer} layers fits 1 to {} of them",
            n_layer / 2
        )));
    }
    let units = n_layer + 1;
    let windows = (0..n_win)
        .map(|w| {
            let (a, b) = (w * units / n_win, (w + 1) * units / n_win);
            Window {
                device: w % nodes,
                units: a as u32..b as u32,
                streamed: (a..b).map(|u| u < n_layer && u % 2 == 1).collect(),
            }
        })
        .collect();
    Ok(Plan {
        epoch: 1,
        planner: Planner::Ring,
        ring: (0..nodes).map(|i| format!("node{i}")).collect(),
        windows,
        kv_budget_bytes: vec![0; nodes],
        slots: 2,
        loading: Loading::Prefetch,
        micro_batches: 1,
        batch: 1,
        context_tokens: 2048,
    })
}

/// Writes the demo directory for `nodes` nodes running `model`.
pub fn prepare(dir: &Path, model: &Path, nodes: usize) -> Result<DemoFile, RingError> {
    let gguf = Gguf::open(model).map_err(|e| RingError::Engine(e.into()))?;
    let c =
        crate::model::config::Config::from_gguf(&gguf).map_err(|e| RingError::Engine(e.into()))?;
    let plan = demo_plan(c.n_layer, nodes)?;
    prepare_plan(dir, model, plan)
}

/// Writes a directory for running `plan` (one node per ring member) on
/// `model`, without emulation; the caller may add it and write the file
/// again with [`write_file`].
pub fn prepare_plan(dir: &Path, model: &Path, plan: Plan) -> Result<DemoFile, RingError> {
    let nodes = plan.ring.len();
    create_ca(&dir.join("ca")).map_err(|e| err("creating the CA", e))?;
    let mut list = Vec::new();
    for i in 0..nodes {
        let id = 0x1000 + i as u64;
        create_node(&dir.join("ca"), &dir.join(format!("node{i}")), NodeId(id))
            .map_err(|e| err("creating a node identity", e))?;
        // A free port: taken from the OS, then let go for the node.
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(|e| err("finding a free port", e))?;
        list.push((id, port));
    }
    let file = DemoFile {
        plan,
        nodes: list,
        model: std::fs::canonicalize(model).map_err(|e| err("model path", e))?,
        emulation: Vec::new(),
        links: Vec::new(),
    };
    write_file(dir, &file)?;
    Ok(file)
}

/// Writes `demo.json` into `dir`.
pub fn write_file(dir: &Path, file: &DemoFile) -> Result<(), RingError> {
    let json = serde_json::to_vec_pretty(file).map_err(|e| err("demo.json", e))?;
    std::fs::write(dir.join("demo.json"), json).map_err(|e| err("writing demo.json", e))
}

/// Starts demo node `index` from the directory `prepare` wrote.
pub fn start_node(
    dir: &Path,
    index: usize,
    rt: &tokio::runtime::Handle,
) -> Result<RingNode, RingError> {
    let bytes = std::fs::read(dir.join("demo.json")).map_err(|e| err("reading demo.json", e))?;
    let file: DemoFile = serde_json::from_slice(&bytes).map_err(|e| err("demo.json", e))?;
    let &(_, addr) = file
        .nodes
        .get(index)
        .ok_or_else(|| RingError::Plan(format!("no node {index} in demo.json")))?;
    let identity = NodeIdentity::load(&dir.join(format!("node{index}")))
        .map_err(|e| err("loading the node identity", e))?;
    let endpoint = {
        let _g = rt.enter();
        Endpoint::bind(addr, &identity, Limits::default()).map_err(|e| err("binding", e))?
    };
    let peers = file
        .nodes
        .iter()
        .map(|&(id, addr)| Peer {
            id: NodeId(id),
            addr,
        })
        .collect();
    let mut config = RingConfig::new(file.plan, index, peers, file.model);
    config.emulation = file.emulation.get(index).copied().unwrap_or_default();
    if let Some(Some(link)) = file.links.get(index) {
        let link: LinkEmulation = link.parse().map_err(|e| err("demo.json link", e))?;
        config.links = (0..file.nodes.len())
            .map(|j| (j != index).then_some(link))
            .collect();
    }
    RingNode::start(config, endpoint, rt)
}

/// A conversation with the ring, at the head node.
pub struct RingChat {
    head: RingNode,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: Vec<ChatMessage>,
    max_tokens: usize,
}

impl RingChat {
    pub fn new(head: RingNode, model: &Path, max_tokens: usize) -> Result<RingChat, RingError> {
        let gguf = Gguf::open(model).map_err(|e| RingError::Engine(e.into()))?;
        let tokenizer = Tokenizer::from_gguf(gguf.metadata()).map_err(|e| err("tokenizer", e))?;
        let template = ChatTemplate::for_model(gguf.metadata(), &tokenizer, TemplateChoice::Auto)
            .map_err(|e| err("chat template", e))?;
        Ok(RingChat {
            head,
            tokenizer,
            template,
            messages: Vec::new(),
            max_tokens,
        })
    }

    /// Answers `user` (greedy); the exchange joins the history.
    pub fn reply(&mut self, user: &str) -> Result<String, RingError> {
        self.messages.push(ChatMessage::new(Role::User, user));
        let answer = self.answer();
        match &answer {
            Ok(text) => self
                .messages
                .push(ChatMessage::new(Role::Assistant, text.clone())),
            Err(_) => {
                self.messages.pop();
            }
        }
        answer
    }

    fn answer(&mut self) -> Result<String, RingError> {
        let prompt = self
            .template
            .render(&self.messages, true)
            .map_err(|e| err("chat template", e))?;
        let ids = self
            .tokenizer
            .encode_prompt(&prompt)
            .map_err(|e| err("tokenizer", e))?;
        let eos = self.tokenizer.eos();
        let out = self
            .head
            .submit(RingRequest {
                prompt: ids,
                max_tokens: self.max_tokens,
                stop: eos,
                keep_logits: false,
                sampling: None,
            })?
            .wait(std::time::Duration::from_secs(600))?;
        let tokens: Vec<u32> = out.tokens.into_iter().filter(|&t| Some(t) != eos).collect();
        Ok(self.tokenizer.decode(&tokens, true))
    }

    pub fn head(&self) -> &RingNode {
        &self.head
    }
}

/// A running demo: the directory, the child node processes and the chat.
pub struct Demo {
    pub chat: RingChat,
    dir: PathBuf,
    children: Vec<std::process::Child>,
    _rt: tokio::runtime::Runtime,
}

impl Demo {
    /// Prepares a directory under the system's temporary one, starts nodes
    /// `1..nodes` as child processes of `exe` (`exe demo-node --dir D
    /// --index I`) and node 0 here.
    pub fn start(
        exe: &Path,
        model: &Path,
        nodes: usize,
        max_tokens: usize,
    ) -> Result<Demo, RingError> {
        let dir = std::env::temp_dir().join(format!("loip-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| err("creating the demo directory", e))?;
        prepare(&dir, model, nodes)?;
        let mut children = Vec::new();
        for i in 1..nodes {
            let child = std::process::Command::new(exe)
                .arg("demo-node")
                .arg("--dir")
                .arg(&dir)
                .arg("--index")
                .arg(i.to_string())
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| err("starting a node process", e))?;
            children.push(child);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| err("starting the runtime", e))?;
        let head = start_node(&dir, 0, rt.handle())?;
        let chat = RingChat::new(head, model, max_tokens)?;
        Ok(Demo {
            chat,
            dir,
            children,
            _rt: rt,
        })
    }
}

impl Drop for Demo {
    /// Closes the children's standard input, which ends them, and removes
    /// the directory.
    fn drop(&mut self) {
        for c in &mut self.children {
            drop(c.stdin.take());
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs demo node `index` until its standard input closes.
pub fn run_child(dir: &Path, index: usize) -> Result<(), RingError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| err("starting the runtime", e))?;
    let node = start_node(dir, index, rt.handle())?;
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    node.shutdown();
    Ok(())
}
