//! Shared by the training tests.

use std::path::PathBuf;

/// A fresh, empty scratch folder for one test (removed first if a previous run left it).
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ouro-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
