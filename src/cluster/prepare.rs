//! A node prepares its part of a plan: it checks that it can read every
//! tensor of its windows, and fetches what it lacks from peers.
//!
//! A node whose model file is the leader's (same digest) reads its windows
//! from it, and only checks that the tensors are there. A node without it
//! (the plan lists what it must fetch, with digests) keeps its tensors in a
//! *shard*: `model-shard.gguf` in its data directory, a valid GGUF file
//! with the model's metadata and only those tensors, which
//! [`Gguf::open`] reads like any model file. Tensors already in the shard
//! with the right digest are kept; the others are fetched
//! ([`super::fetch`]) from the plan's sources in order, each source tried
//! in turn when one fails (refusal, stall, wrong digest). The new shard is
//! written with a temporary name, fsynced and renamed over the old one, so
//! a file with the final name is always complete and checked.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::Connection;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use super::dist::{window_tensors, Digest, PlanBody, TensorEntry};
use super::fetch::{fetch_to_file, Expect, FetchLimits, FetchRequest, LocalModel};
use super::membership::Epoch;
use crate::model::config::Config as ModelConfig;
use crate::model::dtype::GgmlType;
use crate::model::gguf::{Gguf, GgufWriter, Value};
use crate::net::NodeId;

/// Metadata key naming the model a shard belongs to (hex digest).
pub const SHARD_MODEL_KEY: &str = crate::model::config::SHARD_KEY;
/// The shard's name in the data directory.
pub const SHARD_FILE: &str = "model-shard.gguf";

#[derive(Debug, Error)]
pub enum PrepareError {
    #[error("the plan has this node read its windows from model {want}, but {have}")]
    NoModel { want: String, have: String },
    #[error("the local model has no tensor {0}")]
    MissingTensor(String),
    #[error("{what}: no source could provide it ({tried})")]
    Fetch { what: String, tried: String },
    #[error("the shard {}: {message}", path.display())]
    Shard { path: PathBuf, message: String },
    #[error("the model's metadata: {0}")]
    Metadata(String),
}

/// What a preparation produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The shard holding this node's tensors, when it has no model file.
    pub shard: Option<PathBuf>,
    pub fetched: usize,
    pub reused: usize,
}

/// Everything a preparation needs.
pub struct PrepareSpec<'a> {
    pub me: NodeId,
    pub epoch: Epoch,
    pub body: &'a PlanBody,
    pub local: Option<Arc<LocalModel>>,
    pub data_dir: &'a Path,
    /// Connected peers that may serve tensors, in the order to try them.
    pub sources: Vec<(NodeId, Connection)>,
    pub limits: FetchLimits,
}

fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Prepares this node's windows (module docs).
pub async fn prepare(spec: PrepareSpec<'_>) -> Result<Prepared, PrepareError> {
    let body = spec.body;
    let (Some(_), Some(model)) = (&body.plan, &body.model) else {
        return Ok(Prepared::default());
    };
    let windows = body.windows_of(spec.me);
    if windows.is_empty() {
        return Ok(Prepared::default());
    }
    let Some(fetch) = body.fetch_of(spec.me) else {
        // Read from our own file: it must be the leader's, with the tensors.
        let local = match &spec.local {
            Some(l) if l.info.digest == model.digest => l,
            other => {
                return Err(PrepareError::NoModel {
                    want: hex(&model.digest)[..16].to_string(),
                    have: other.as_ref().map_or("this node has none".into(), |l| {
                        format!("this node has {}", &hex(&l.info.digest)[..16])
                    }),
                })
            }
        };
        let config = ModelConfig::from_gguf(&local.gguf)
            .map_err(|e| PrepareError::Metadata(e.to_string()))?;
        let first = body.plan.as_ref().and_then(|p| p.windows.first());
        let runs_first = first.is_some_and(|w| body.position(spec.me) == Some(w.device));
        for name in window_tensors(&config, &windows, runs_first) {
            if local.gguf.tensor(&name).is_none() {
                return Err(PrepareError::MissingTensor(name));
            }
        }
        return Ok(Prepared::default());
    };
    let shard_path = spec.data_dir.join(SHARD_FILE);
    let tmp_dir = spec.data_dir.join("fetch.tmp");
    fs::create_dir_all(&tmp_dir).map_err(|e| PrepareError::Shard {
        path: tmp_dir.clone(),
        message: e.to_string(),
    })?;
    let model_hex = hex(&model.digest);
    // The shard we have, if it is of this model.
    let old = Gguf::open(&shard_path).ok().filter(|g| {
        g.metadata()
            .get(SHARD_MODEL_KEY)
            .is_some_and(|v| *v == Value::String(model_hex.clone()))
    });
    let old = old.map(Arc::new);
    let keep = |t: &TensorEntry| -> bool {
        old.as_ref().is_some_and(|g| {
            g.tensor(&t.name).is_some_and(|i| {
                i.size == t.size && {
                    let d: Digest = Sha256::digest(g.tensor_data(i)).into();
                    d == t.sha256
                }
            })
        })
    };
    let mut reused = Vec::new();
    let mut missing = Vec::new();
    for t in &fetch.tensors {
        if keep(t) {
            reused.push(t.clone());
        } else {
            missing.push(t.clone());
        }
    }
    let same_set = old
        .as_ref()
        .is_some_and(|g| g.tensors().len() == fetch.tensors.len());
    if missing.is_empty() && same_set {
        return Ok(Prepared {
            shard: Some(shard_path),
            fetched: 0,
            reused: reused.len(),
        });
    }

    // Metadata: from the old shard, else fetched.
    let metadata: Vec<(String, Value)> = match &old {
        Some(g) => g
            .metadata()
            .iter()
            .filter(|(k, _)| !k.starts_with("loip.shard."))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        None => {
            let part = tmp_dir.join("metadata.part");
            let req = FetchRequest::Metadata {
                epoch: spec.epoch,
                model: model.digest,
            };
            let expect = Expect {
                len: model.metadata_len,
                sha256: model.metadata_sha256,
            };
            fetch_from_any(&spec, &req, expect, &part).await?;
            let bytes = fs::read(&part).map_err(|e| PrepareError::Metadata(e.to_string()))?;
            let _ = fs::remove_file(&part);
            let g = Gguf::from_bytes(bytes).map_err(|e| PrepareError::Metadata(e.to_string()))?;
            g.metadata()
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        }
    };

    let mut parts: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (i, t) in missing.iter().enumerate() {
        let part = tmp_dir.join(format!("{i}.part"));
        let req = FetchRequest::Tensor {
            epoch: spec.epoch,
            model: model.digest,
            name: t.name.clone(),
        };
        if let Err(e) = fetch_from_any(&spec, &req, Expect::of(t), &part).await {
            for p in parts.values() {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        parts.insert(t.name.clone(), part);
    }

    // Write the shard: temporary name, fsync, rename (GgufWriter::write).
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        w.add_kv(&k, v);
    }
    w.add_kv(SHARD_MODEL_KEY, Value::String(model_hex));
    for t in &fetch.tensors {
        let ty = GgmlType::from_id(t.ty).map_err(|e| PrepareError::Shard {
            path: shard_path.clone(),
            message: format!("tensor {}: {e}", t.name),
        })?;
        if let Some(part) = parts.get(&t.name) {
            let part = part.clone();
            w.add_tensor_with(&t.name, &t.dims, ty, move |out| {
                let mut f = fs::File::open(&part)?;
                std::io::copy(&mut f, out)?;
                Ok(())
            });
        } else if let Some(g) = &old {
            let g = g.clone();
            let name = t.name.clone();
            w.add_tensor_with(&t.name, &t.dims, ty, move |out| {
                let info = g
                    .tensor(&name)
                    .ok_or_else(|| std::io::Error::other(format!("{name} left the shard")))?;
                out.write_all(g.tensor_data(info))
            });
        }
    }
    let path = shard_path.clone();
    let written = tokio::task::spawn_blocking(move || w.write(&path))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    for p in parts.values() {
        let _ = fs::remove_file(p);
    }
    written.map_err(|message| PrepareError::Shard {
        path: shard_path.clone(),
        message,
    })?;
    check_shard(&shard_path, &fetch.tensors)?;
    Ok(Prepared {
        shard: Some(shard_path),
        fetched: missing.len(),
        reused: reused.len(),
    })
}

/// Opens a shard and checks it holds `tensors` with their sizes.
pub fn check_shard(path: &Path, tensors: &[TensorEntry]) -> Result<(), PrepareError> {
    let g = Gguf::open(path).map_err(|e| PrepareError::Shard {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    for t in tensors {
        match g.tensor(&t.name) {
            Some(i) if i.size == t.size && i.dims == t.dims => {}
            _ => {
                return Err(PrepareError::Shard {
                    path: path.to_path_buf(),
                    message: format!("tensor {} is missing or has another shape", t.name),
                })
            }
        }
    }
    Ok(())
}

/// Tries each source in turn; the error lists what each said.
async fn fetch_from_any(
    spec: &PrepareSpec<'_>,
    req: &FetchRequest,
    expect: Expect,
    part: &Path,
) -> Result<(), PrepareError> {
    let mut tried = Vec::new();
    for (peer, conn) in &spec.sources {
        match fetch_to_file(conn, *peer, req, expect, part, &spec.limits).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                log::warn!("fetch: {e}");
                tried.push(e.to_string());
            }
        }
    }
    if tried.is_empty() {
        tried.push("no connected peer holds the model".into());
    }
    Err(PrepareError::Fetch {
        what: req.what(),
        tried: tried.join("; "),
    })
}
