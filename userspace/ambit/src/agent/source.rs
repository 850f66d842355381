//! Sources of desired state. The rest of the node only sees `State` updates; where they come
//! from (a file, or the Kubernetes API) stays behind `StateSource`.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::sync::mpsc;
use tracing::{error, info};

use crate::{config::LocalConfig, state::State};

pub trait StateSource: Send + 'static {
    /// The state to start from; an error here stops the node (nothing is running yet).
    fn initial(&mut self) -> Result<Arc<State>>;

    /// Sends each later valid state. Invalid updates are reported and skipped: the last good
    /// state stays in force.
    fn watch(self: Box<Self>, updates: mpsc::Sender<Arc<State>>) -> tokio::task::JoinHandle<()>;
}

/// What tells a watched file's edits apart: editors replace files (new mtime) or rewrite them
/// in place (new mtime or length).
pub(crate) fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// A ztunnel-format local config file, re-read when it changes.
pub struct FileSource {
    path: PathBuf,
    node: String,
    trust_domain: String,
    poll: Duration,
    last_seen: Option<(SystemTime, u64)>,
    last_text: String,
}

impl FileSource {
    pub fn new(path: &Path, node: &str, trust_domain: &str) -> Self {
        Self {
            path: path.to_owned(),
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            poll: Duration::from_millis(500),
            last_seen: None,
            last_text: String::new(),
        }
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        file_stamp(&self.path)
    }

    fn load(&mut self) -> Result<Option<Arc<State>>> {
        self.last_seen = self.stamp();
        let text = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        if text == self.last_text {
            return Ok(None);
        }
        self.last_text = text.clone();
        let config = LocalConfig::parse(&text, &self.path.display().to_string())?;
        Ok(Some(Arc::new(State::from_config(
            &config,
            &self.node,
            &self.trust_domain,
        )?)))
    }
}

impl StateSource for FileSource {
    fn initial(&mut self) -> Result<Arc<State>> {
        Ok(self.load()?.unwrap_or_default())
    }

    fn watch(
        mut self: Box<Self>,
        updates: mpsc::Sender<Arc<State>>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.poll);
            loop {
                tick.tick().await;
                // Editors replace files (new inode, new mtime) or rewrite them in place; both
                // change the mtime or length. The text comparison filters touch-only changes.
                if self.stamp() == self.last_seen {
                    continue;
                }
                match self.load() {
                    Ok(Some(state)) => {
                        info!(file = %self.path.display(), "config changed; applying");
                        if updates.send(state).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => error!("config rejected, the last good config stays in force: {e:#}"),
                }
            }
        })
    }
}
