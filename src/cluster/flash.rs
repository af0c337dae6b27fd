//! Device provisioning ("flashing"): writes what a node needs onto a target
//! root filesystem (a directory, or a mounted image) so that it joins the
//! cluster at its first boot with no further configuration.
//!
//! What lands on the target:
//! - `/usr/bin/loip`, the binary;
//! - `/etc/loip/loip.toml`, the node's config;
//! - `/var/lib/loip/identity/`: the cluster CA certificate and this node's
//!   certificate and key, made from the cluster CA with a fresh node id;
//! - `/var/lib/loip/models/NAME`: the model, whole or only the tensors of
//!   the units a planned device runs;
//! - `/etc/systemd/system/loip.service`, its enablement link, and a
//!   sysusers.d entry that creates the `loip` user at boot.
//!
//! Every file is written to a temporary name in its directory, fsynced and
//! renamed, so a full disk or a killed process never leaves a file the node
//! would trust. A [`Flash`] is planned first ([`Flash::plan`]) and then
//! carried out ([`Flash::apply`]); `--dry-run` prints the plan.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use thiserror::Error;

use super::config::FileConfig;
use crate::model::gguf::{Gguf, GgufError, GgufWriter};
use crate::net::identity::{self, IdentityError, CA_CERT_FILE};
use crate::store::atomic;

/// The unit file installed on the target.
pub const SERVICE_UNIT: &str = include_str!("../../systemd/loip.service");
/// Creates the service's user at boot (systemd-sysusers).
pub const SYSUSERS: &str = include_str!("../../provisioning/sysusers-loip.conf");

const BINARY: &str = "usr/bin/loip";
const CONFIG: &str = "etc/loip/loip.toml";
const STATE: &str = "var/lib/loip";
const SERVICE: &str = "etc/systemd/system/loip.service";
const WANTS: &str = "etc/systemd/system/multi-user.target.wants/loip.service";
const SYSUSERS_FILE: &str = "usr/lib/sysusers.d/loip.conf";

#[derive(Debug, Error)]
pub enum FlashError {
    #[error("target {0}: does not look like a root filesystem (it needs etc/ and usr/)")]
    NotARoot(PathBuf),
    #[error(
        "target {target}: holds the identity of another cluster (CA fingerprint {theirs}, flashing {ours}); use --force to replace it"
    )]
    OtherCluster {
        target: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("model {path}: {source}")]
    Model { path: PathBuf, source: GgufError },
    #[error("units {spec:?}: {problem}")]
    Units { spec: String, problem: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("config: {0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> FlashError + '_ {
    move |e| FlashError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// What to flash.
#[derive(Clone, Debug)]
pub struct FlashSpec {
    pub target: PathBuf,
    /// The cluster CA directory (`loip provision ca`).
    pub ca: PathBuf,
    /// The binary to install (normally this executable).
    pub binary: PathBuf,
    pub model: Option<PathBuf>,
    /// Units to keep (`0-13,28-41`; the unit after the last layer is the
    /// output head); `None` copies the whole model.
    pub units: Option<String>,
    pub mem_budget: Option<String>,
    pub listen: Option<String>,
    pub peers: Vec<String>,
    pub expect: Option<usize>,
    /// Replace another cluster's identity on the target.
    pub force: bool,
}

/// One step of a flash.
/// What a file step writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    Binary,
    Config,
    Unit,
    Sysusers,
    Model,
    /// Only the tensors of the planned units.
    ModelUnits,
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Content::Binary => "binary",
            Content::Config => "config",
            Content::Unit => "systemd unit",
            Content::Sysusers => "sysusers.d entry",
            Content::Model => "model",
            Content::ModelUnits => "model, planned units",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A file (binary, config, unit, model) written by temp + fsync + rename.
    File {
        path: PathBuf,
        bytes: u64,
        mode: u32,
        content: Content,
    },
    /// A node certificate and key made from the cluster CA.
    Identity {
        dir: PathBuf,
        replace: bool,
    },
    /// The identity already on the target belongs to this cluster: kept,
    /// so the node keeps its id.
    KeepIdentity {
        dir: PathBuf,
    },
    Symlink {
        path: PathBuf,
        to: PathBuf,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::File {
                path,
                bytes,
                mode,
                content,
            } => write!(
                f,
                "write   {} ({content}, {bytes} bytes, mode {mode:o})",
                path.display()
            ),
            Step::Identity { dir, replace } => write!(
                f,
                "create  {} (node certificate and key{})",
                dir.display(),
                if *replace {
                    ", replacing another cluster's"
                } else {
                    ""
                }
            ),
            Step::KeepIdentity { dir } => {
                write!(f, "keep    {} (this cluster's identity)", dir.display())
            }
            Step::Symlink { path, to } => {
                write!(f, "link    {} -> {}", path.display(), to.display())
            }
        }
    }
}

/// A planned flash: its steps, and what they need.
pub struct Flash {
    spec: FlashSpec,
    config: String,
    model_name: Option<String>,
    /// The source model, when a subset is written.
    subset: Option<(Arc<Gguf>, Vec<usize>)>,
    pub steps: Vec<Step>,
}

impl Flash {
    /// Checks the target and the inputs and lists what [`Flash::apply`]
    /// would do, writing nothing.
    pub fn plan(spec: FlashSpec) -> Result<Flash, FlashError> {
        let t = &spec.target;
        if !t.join("etc").is_dir() || !t.join("usr").is_dir() {
            return Err(FlashError::NotARoot(t.clone()));
        }
        let ca_cert = fs::read(spec.ca.join(CA_CERT_FILE)).map_err(io_err(&spec.ca))?;
        let ours = fingerprint_of(&spec.ca.join(CA_CERT_FILE), &ca_cert)?;
        let ident_dir = t.join(STATE).join("identity");
        let mut steps = Vec::new();
        let binary_len = fs::metadata(&spec.binary)
            .map_err(io_err(&spec.binary))?
            .len();
        steps.push(Step::File {
            path: t.join(BINARY),
            bytes: binary_len,
            mode: 0o755,
            content: Content::Binary,
        });
        let theirs = ident_dir.join(CA_CERT_FILE);
        match fs::read(&theirs) {
            Ok(bytes) => {
                let theirs_fp = fingerprint_of(&theirs, &bytes)?;
                if theirs_fp == ours {
                    steps.push(Step::KeepIdentity {
                        dir: ident_dir.clone(),
                    });
                } else if spec.force {
                    steps.push(Step::Identity {
                        dir: ident_dir.clone(),
                        replace: true,
                    });
                } else {
                    return Err(FlashError::OtherCluster {
                        target: t.clone(),
                        theirs: theirs_fp,
                        ours,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => steps.push(Step::Identity {
                dir: ident_dir.clone(),
                replace: false,
            }),
            Err(e) => return Err(io_err(&theirs)(e)),
        }

        let mut model_name = None;
        let mut subset = None;
        if let Some(m) = &spec.model {
            let name = m
                .file_name()
                .ok_or_else(|| FlashError::Config(format!("model {}: no file name", m.display())))?
                .to_string_lossy()
                .into_owned();
            let gguf = Arc::new(Gguf::open(m).map_err(|source| FlashError::Model {
                path: m.clone(),
                source,
            })?);
            let bytes = match &spec.units {
                None => fs::metadata(m).map_err(io_err(m))?.len(),
                Some(u) => {
                    let keep = subset_tensors(&gguf, u)?;
                    let writer = subset_writer(&gguf, &keep);
                    let len = writer.file_len().map_err(|source| FlashError::Model {
                        path: m.clone(),
                        source,
                    })?;
                    subset = Some((gguf, keep));
                    len
                }
            };
            steps.push(Step::File {
                path: t.join(STATE).join("models").join(&name),
                bytes,
                mode: 0o644,
                content: if spec.units.is_some() {
                    Content::ModelUnits
                } else {
                    Content::Model
                },
            });
            model_name = Some(name);
        }

        let config = render_config(&spec, model_name.as_deref())?;
        steps.push(Step::File {
            path: t.join(CONFIG),
            bytes: config.len() as u64,
            mode: 0o644,
            content: Content::Config,
        });
        steps.push(Step::File {
            path: t.join(SERVICE),
            bytes: SERVICE_UNIT.len() as u64,
            mode: 0o644,
            content: Content::Unit,
        });
        steps.push(Step::File {
            path: t.join(SYSUSERS_FILE),
            bytes: SYSUSERS.len() as u64,
            mode: 0o644,
            content: Content::Sysusers,
        });
        steps.push(Step::Symlink {
            path: t.join(WANTS),
            to: PathBuf::from("/").join(SERVICE),
        });
        Ok(Flash {
            spec,
            config,
            model_name,
            subset,
            steps,
        })
    }

    /// Carries out the steps. A failure leaves every file the node reads
    /// either as it was or whole.
    pub fn apply(&self) -> Result<(), FlashError> {
        for step in &self.steps {
            match step {
                Step::File {
                    path,
                    content,
                    mode,
                    ..
                } => match content {
                    Content::Binary => copy_atomic(&self.spec.binary, path, *mode)?,
                    Content::Config => write_atomic(path, self.config.as_bytes(), *mode)?,
                    Content::Unit => write_atomic(path, SERVICE_UNIT.as_bytes(), *mode)?,
                    Content::Sysusers => write_atomic(path, SYSUSERS.as_bytes(), *mode)?,
                    Content::Model | Content::ModelUnits => self.write_model(path)?,
                },
                Step::Identity { dir, .. } => make_identity(&self.spec.ca, dir)?,
                Step::KeepIdentity { .. } => {}
                Step::Symlink { path, to } => symlink_atomic(to, path)?,
            }
        }
        Ok(())
    }

    /// The model's file name on the target.
    pub fn model_name(&self) -> Option<&str> {
        self.model_name.as_deref()
    }

    fn write_model(&self, path: &Path) -> Result<(), FlashError> {
        let src = self.spec.model.as_ref().expect("a model step has a model");
        make_dirs(path.parent().expect("model path has a parent"))?;
        match &self.subset {
            None => copy_atomic(src, path, 0o644),
            Some((gguf, keep)) => {
                subset_writer(gguf, keep)
                    .write(path)
                    .map_err(|source| FlashError::Model {
                        path: path.to_path_buf(),
                        source,
                    })
            }
        }
    }
}

fn fingerprint_of(path: &Path, pem: &[u8]) -> Result<String, FlashError> {
    let der = CertificateDer::from_pem_slice(pem).map_err(|_| FlashError::Io {
        path: path.to_path_buf(),
        message: "no PEM certificate in the file".into(),
    })?;
    let fp = identity::cluster_fingerprint(&der);
    Ok(fp[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// The config the node starts with: paths on the target, and the given
/// cluster settings. Checked by parsing it back as `loip run` will.
fn render_config(spec: &FlashSpec, model: Option<&str>) -> Result<String, FlashError> {
    let mut t = toml::Table::new();
    let state = PathBuf::from("/").join(STATE);
    t.insert("data_dir".into(), state.display().to_string().into());
    t.insert(
        "identity".into(),
        state.join("identity").display().to_string().into(),
    );
    if let Some(m) = model {
        t.insert(
            "model".into(),
            state.join("models").join(m).display().to_string().into(),
        );
    }
    if let Some(b) = &spec.mem_budget {
        t.insert("mem_budget".into(), b.clone().into());
    }
    if let Some(l) = &spec.listen {
        t.insert("listen".into(), l.clone().into());
    }
    if !spec.peers.is_empty() {
        let peers: Vec<toml::Value> = spec.peers.iter().map(|p| p.clone().into()).collect();
        t.insert("peers".into(), peers.into());
    }
    if let Some(n) = spec.expect {
        t.insert("expect".into(), (n as i64).into());
    }
    let text = format!(
        "# Written by `loip flash`. Keys: see `loip run --help`.\n{}",
        toml::to_string(&t).map_err(|e| FlashError::Config(e.to_string()))?
    );
    FileConfig::parse(Path::new("loip.toml"), &text)
        .and_then(FileConfig::validate)
        .map_err(|e| FlashError::Config(e.to_string()))?;
    Ok(text)
}

/// Indices of the tensors a device running `units` needs: the blocks of
/// its layers; the token embedding if it runs the first layer (it embeds);
/// the output norm and head if it runs the head unit (`n_layer`), and the
/// embedding too when the head is tied to it.
fn subset_tensors(gguf: &Gguf, spec: &str) -> Result<Vec<usize>, FlashError> {
    let bad = |problem: String| FlashError::Units {
        spec: spec.to_string(),
        problem,
    };
    let meta = gguf.metadata();
    let n_layer = meta
        .get_str("general.architecture")
        .and_then(|arch| meta.get_u32(&format!("{arch}.block_count")))
        .map_err(|e| bad(format!("the model's layer count: {e}")))? as usize;
    let mut units = vec![false; n_layer + 1];
    for part in spec.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part.trim(), part.trim()),
        };
        let (a, b) = match (a.parse::<usize>(), b.parse::<usize>()) {
            (Ok(a), Ok(b)) if a <= b && b <= n_layer => (a, b),
            _ => {
                return Err(bad(format!(
                    "{part:?} is not a unit or range within 0-{n_layer} ({n_layer} is the head)"
                )))
            }
        };
        units[a..=b].iter_mut().for_each(|u| *u = true);
    }
    let head = units[n_layer];
    let tied = gguf.tensor("output.weight").is_none();
    let keep = gguf
        .tensors()
        .iter()
        .enumerate()
        .filter(|(_, t)| match t.name.strip_prefix("blk.") {
            Some(rest) => rest
                .split('.')
                .next()
                .and_then(|l| l.parse::<usize>().ok())
                .is_some_and(|l| l < n_layer && units[l]),
            None => match t.name.as_str() {
                "token_embd.weight" => units[0] || (head && tied),
                "output_norm.weight" | "output.weight" => head,
                // Shared tables (rope_freqs) are small: every device keeps them.
                _ => true,
            },
        })
        .map(|(i, _)| i)
        .collect();
    Ok(keep)
}

/// A GGUF with the source's metadata and the tensors `keep`, their bytes
/// streamed from the source's mapping.
fn subset_writer(gguf: &Arc<Gguf>, keep: &[usize]) -> GgufWriter {
    let mut w = GgufWriter::with_version(gguf.version());
    for (k, v) in gguf.metadata().iter() {
        w.add_kv(k, v.clone());
    }
    for &i in keep {
        let t = &gguf.tensors()[i];
        let src = Arc::clone(gguf);
        w.add_tensor_with(&t.name, &t.dims, t.ty, move |out| {
            out.write_all(src.tensor_data(&src.tensors()[i]))
        });
    }
    w
}

fn make_dirs(dir: &Path) -> Result<(), FlashError> {
    fs::create_dir_all(dir).map_err(io_err(dir))
}

/// Writes `path` whole through [`atomic::write_with`], making its directory.
fn write_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), FlashError> {
    make_dirs(path.parent().expect("target paths have a parent"))?;
    atomic::write_with(path, mode, fill).map_err(io_err(path))
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FlashError> {
    write_with(path, mode, |f| f.write_all(bytes))
}

fn sync_dir(dir: &Path) -> Result<(), FlashError> {
    atomic::sync_dir(dir).map_err(io_err(dir))
}

fn copy_atomic(src: &Path, path: &Path, mode: u32) -> Result<(), FlashError> {
    let mut from = File::open(src).map_err(io_err(src))?;
    let mut read_err = None;
    let result = write_with(path, mode, |f| {
        // A read error is the source's, a write error the target's.
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) => {
                    read_err = Some(e.to_string());
                    return Err(io::Error::other("reading the source failed"));
                }
            };
            f.write_all(&buf[..n])?;
        }
    });
    match read_err {
        Some(message) => Err(FlashError::Io {
            path: src.to_path_buf(),
            message,
        }),
        None => result,
    }
}

fn symlink_atomic(to: &Path, path: &Path) -> Result<(), FlashError> {
    let dir = path.parent().expect("target paths have a parent");
    make_dirs(dir)?;
    let tmp = atomic::temp_path(path);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(path)(e)
        })?;
    sync_dir(dir)
}

/// Makes the node's certificate and key in a staging directory beside
/// `dir`, syncs them and renames the directory into place (a replaced
/// identity is moved aside first, then removed).
fn make_identity(ca: &Path, dir: &Path) -> Result<(), FlashError> {
    let parent = dir.parent().expect("identity dir has a parent");
    make_dirs(parent)?;
    let staging = atomic::temp_path(dir);
    let _ = fs::remove_dir_all(&staging);
    make_dirs(&staging)?;
    let made = (|| {
        identity::create_node(ca, &staging, identity::random_node_id())?;
        for entry in fs::read_dir(&staging).map_err(io_err(&staging))? {
            let p = entry.map_err(io_err(&staging))?.path();
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&p))?;
        }
        sync_dir(&staging)?;
        let old = dir.with_file_name(".identity.replaced");
        if dir.exists() {
            let _ = fs::remove_dir_all(&old);
            fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        fs::rename(&staging, dir).map_err(io_err(dir))?;
        sync_dir(parent)?;
        let _ = fs::remove_dir_all(&old);
        Ok(())
    })();
    if made.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    made
}
