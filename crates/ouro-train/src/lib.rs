//! Training for ouro: corpora and packed batches, AdamW with decay groups, warmup + cosine schedule,
//! the training loop (checkpoints, bit-for-bit resume, metrics, plots), and the Mamba paper's synthetic tasks.

pub mod arith;
pub mod config;
pub mod data;
pub mod distill;
pub mod fetch;
pub mod model;
pub mod operator;
pub mod optim;
pub mod pde;
pub mod plot;
pub mod seqfit;
pub mod tasks;
pub mod train;

use std::path::Path;

/// Writes a file whole: `bytes` into `path` + ".tmp", then renamed over `path` (a reader sees the old file or
/// the whole new one). Errors name the file.
pub(crate) fn write_file(path: &Path, bytes: impl AsRef<[u8]>) -> candle_core::Result<()> {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    let tmp = std::path::PathBuf::from(name);
    std::fs::write(&tmp, bytes).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

/// Writes a folder whole: `fill` writes into a temporary sibling (`dir` with extension `tmp`), which then
/// replaces `dir`. A reader sees the old folder or the whole new one; a process stopped between the removal
/// and the rename leaves the complete temporary folder.
pub(crate) fn write_folder(dir: &Path, fill: impl FnOnce(&Path) -> candle_core::Result<()>) -> candle_core::Result<()> {
    let err = |e: std::io::Error, p: &Path| candle_core::Error::Msg(format!("{}: {e}", p.display()));
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| err(e, &tmp))?;
    fill(&tmp)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| err(e, dir))
}
