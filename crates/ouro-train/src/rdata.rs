//! A reader for R's data files, enough to take public data sets out of R packages: the serialization
//! format (XDR binary, versions 2 and 3, as written by `saveRDS`, `save` and `serialize`), `.rda`/`.RData`
//! files (`RDX2`/`RDX3` + serialization), `.rds` files, and lazy-load databases (`.rdx` index + `.rdb`
//! blobs, as in a package's `data/Rdata.rdb` or `R/<pkg>.rdb`). Files may be gzip, bzip2 or xz compressed.
//!
//! Values keep their data and attributes; environments keep only that they are environments (their contents
//! are read and dropped, which also keeps a self-referencing environment finite). ALTREP objects are
//! expanded for the classes base R writes (compact integer/real sequences, wrappers, deferred strings of
//! integers); others, byte code and the ASCII/native formats give an error that names them.

use candle_core::{bail, Result};
use std::io::Read;

/// An R value: its data and its attributes (`names`, `class`, `levels`, `row.names`, ...).
#[derive(Clone, Debug, PartialEq)]
pub struct RValue {
    pub data: RData,
    pub attrs: Vec<(String, RValue)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RData {
    Null,
    /// A symbol (SYMSXP).
    Sym(String),
    /// A pairlist (LISTSXP; also calls, closures, promises, `...`): (tag, value) cells.
    Pairlist(Vec<(Option<String>, RValue)>),
    /// Logicals: 0, 1, or `NA_INTEGER` (`i32::MIN`).
    Lgl(Vec<i32>),
    /// Integers (`i32::MIN` is NA). Factors are integer codes into the `levels` attribute.
    Int(Vec<i32>),
    Real(Vec<f64>),
    Cplx(Vec<(f64, f64)>),
    /// A character vector (None is `NA_character_`).
    Str(Vec<Option<String>>),
    /// A generic vector (VECSXP, also expression vectors): lists and data frames.
    List(Vec<RValue>),
    Raw(Vec<u8>),
    /// An environment (contents not kept) or one of R's special environments / values.
    Env(&'static str),
    /// A reference resolved by the writer's hook (PERSISTSXP), a namespace or a package environment.
    Persistent(Vec<Option<String>>),
    /// An S4 object: everything is in its attributes.
    S4,
    /// A builtin or special function, by name.
    Builtin(String),
    /// An external pointer or weak reference (no data survives serialization).
    Pointer,
}

pub const NA_INTEGER: i32 = i32::MIN;

fn err<T>(msg: String) -> Result<T> {
    Err(candle_core::Error::Msg(msg))
}

impl RValue {
    fn new(data: RData) -> Self {
        RValue { data, attrs: Vec::new() }
    }

    pub fn attr(&self, name: &str) -> Option<&RValue> {
        self.attrs.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The values of a character vector (error for anything else).
    pub fn strings(&self) -> Result<&[Option<String>]> {
        match &self.data {
            RData::Str(s) => Ok(s),
            other => err(format!("expected an R character vector, found {}", other.type_name())),
        }
    }

    /// The `names` attribute (empty when absent).
    pub fn names(&self) -> Result<Vec<Option<String>>> {
        match self.attr("names") {
            Some(n) => Ok(n.strings()?.to_vec()),
            None => Ok(Vec::new()),
        }
    }

    /// The `class` attribute (empty when absent).
    pub fn class(&self) -> Vec<String> {
        self.attr("class").and_then(|c| c.strings().ok()).map(|c| c.iter().flatten().cloned().collect()).unwrap_or_default()
    }

    /// The elements of a list (VECSXP) with their names.
    pub fn named_elements(&self) -> Result<Vec<(Option<String>, &RValue)>> {
        let items = match &self.data {
            RData::List(v) => v,
            other => return err(format!("expected an R list, found {}", other.type_name())),
        };
        let mut names = self.names()?;
        names.resize(items.len(), None);
        Ok(names.into_iter().zip(items.iter()).collect())
    }

    /// The element of a named list (or the value of a named pairlist cell).
    pub fn get(&self, name: &str) -> Option<&RValue> {
        match &self.data {
            RData::Pairlist(cells) => cells.iter().find(|(t, _)| t.as_deref() == Some(name)).map(|(_, v)| v),
            RData::List(items) => {
                let names = self.names().ok()?;
                names.iter().position(|n| n.as_deref() == Some(name)).and_then(|i| items.get(i))
            }
            _ => None,
        }
    }

    /// A factor's labels (None for NA).
    pub fn factor_labels(&self) -> Result<Vec<Option<&str>>> {
        let codes = match &self.data {
            RData::Int(c) if self.class().iter().any(|c| c == "factor") => c,
            other => return err(format!("expected an R factor, found {} with class {:?}", other.type_name(), self.class())),
        };
        let levels = self.attr("levels").ok_or_else(|| candle_core::Error::Msg("factor without levels".into()))?.strings()?;
        codes
            .iter()
            .map(|&c| match c {
                NA_INTEGER => Ok(None),
                c if c >= 1 && (c as usize) <= levels.len() => Ok(levels[c as usize - 1].as_deref()),
                c => err(format!("factor code {c} outside its {} levels", levels.len())),
            })
            .collect()
    }

    /// Integers of an integer, logical or integral real vector.
    pub fn ints(&self) -> Result<Vec<i64>> {
        match &self.data {
            RData::Int(v) | RData::Lgl(v) => Ok(v.iter().map(|&x| x as i64).collect()),
            RData::Real(v) if v.iter().all(|x| x.fract() == 0.0 && x.abs() < 9.0e15) => Ok(v.iter().map(|&x| x as i64).collect()),
            other => err(format!("expected R integers, found {}", other.type_name())),
        }
    }
}

impl RData {
    pub fn type_name(&self) -> &'static str {
        match self {
            RData::Null => "NULL",
            RData::Sym(_) => "symbol",
            RData::Pairlist(_) => "pairlist",
            RData::Lgl(_) => "logical",
            RData::Int(_) => "integer",
            RData::Real(_) => "double",
            RData::Cplx(_) => "complex",
            RData::Str(_) => "character",
            RData::List(_) => "list",
            RData::Raw(_) => "raw",
            RData::Env(_) => "environment",
            RData::Persistent(_) => "persistent reference",
            RData::S4 => "S4 object",
            RData::Builtin(_) => "builtin",
            RData::Pointer => "external pointer",
        }
    }
}

/// Undoes gzip, bzip2 or xz compression (recognised by magic bytes); other input is returned as is.
pub fn decompress(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).map_err(|e| candle_core::Error::Msg(format!("gzip: {e}")))?;
    } else if bytes.starts_with(b"BZh") {
        bzip2::read::MultiBzDecoder::new(bytes).read_to_end(&mut out).map_err(|e| candle_core::Error::Msg(format!("bzip2: {e}")))?;
    } else if bytes.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(bytes), &mut out).map_err(|e| candle_core::Error::Msg(format!("xz: {e:?}")))?;
    } else {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// Reads one serialized R value (`serialize()` output: "X\n", version, ...).
pub fn unserialize(bytes: &[u8]) -> Result<RValue> {
    let mut r = Reader { b: bytes, pos: 0, refs: Vec::new(), latin1: false, depth: 0 };
    match bytes.get(..2) {
        Some(b"X\n") => {}
        Some(b"A\n") => bail!("R serialization in ASCII format is not supported (only XDR binary)"),
        Some(b"B\n") => bail!("R serialization in native binary format is not supported (only XDR binary)"),
        _ => bail!("not an R serialization (expected \"X\\n\", found {:02x?})", &bytes[..bytes.len().min(4)]),
    }
    r.pos = 2;
    let version = r.int()?;
    let _writer = r.int()?;
    let _min_reader = r.int()?;
    match version {
        2 => {}
        3 => {
            let n = r.len_of("native encoding")?;
            let enc = String::from_utf8_lossy(r.take(n)?).to_ascii_lowercase();
            r.latin1 = enc == "latin1" || enc == "iso-8859-1" || enc == "iso8859-1";
        }
        v => bail!("R serialization version {v} is not supported (2 and 3 are)"),
    }
    r.item()
}

/// Reads an `.rds` file's content (compressed or not).
pub fn read_rds(bytes: &[u8]) -> Result<RValue> {
    unserialize(&decompress(bytes)?)
}

/// Reads an `.rda`/`.RData` file's content: the saved objects by name.
pub fn read_rda(bytes: &[u8]) -> Result<Vec<(String, RValue)>> {
    let raw = decompress(bytes)?;
    if !(raw.starts_with(b"RDX2\n") || raw.starts_with(b"RDX3\n")) {
        if raw.starts_with(b"RDA") || raw.starts_with(b"RDB") {
            bail!("R data file in ASCII or native binary format is not supported (only XDR: RDX2/RDX3)");
        }
        bail!("not an R data file (expected RDX2/RDX3, found {:02x?})", &raw[..raw.len().min(5)]);
    }
    match unserialize(&raw[5..])?.data {
        RData::Pairlist(cells) => cells.into_iter().map(|(t, v)| Ok((t.unwrap_or_default(), v))).collect(),
        RData::Null => Ok(Vec::new()),
        other => err(format!("R data file holds a {}, expected a pairlist of objects", other.type_name())),
    }
}

/// Reads the variables of a lazy-load database (`<name>.rdx` index and `<name>.rdb` blobs), in index order.
pub fn read_lazy_load_db(rdx: &[u8], rdb: &[u8]) -> Result<Vec<(String, RValue)>> {
    let index = read_rds(rdx).map_err(|e| candle_core::Error::Msg(format!("lazy-load index: {e}")))?;
    let vars = index.get("variables").ok_or_else(|| candle_core::Error::Msg("lazy-load index without 'variables'".into()))?;
    let compressed = match index.get("compressed") {
        Some(c) => *c.ints()?.first().unwrap_or(&0),
        None => 0,
    };
    let mut out = Vec::new();
    for (name, pos) in vars.named_elements()? {
        let name = name.unwrap_or_default();
        let p = pos.ints()?;
        let (off, len) = match p[..] {
            [o, l] if o >= 0 && l >= 0 => (o as usize, l as usize),
            _ => bail!("lazy-load index: bad position {p:?} for '{name}'"),
        };
        let blob = rdb.get(off..off.saturating_add(len)).ok_or_else(|| candle_core::Error::Msg(format!("lazy-load database: '{name}' at {off}+{len} is past its end ({} bytes)", rdb.len())))?;
        let raw = lazy_load_blob(blob, compressed).map_err(|e| candle_core::Error::Msg(format!("lazy-load database, '{name}': {e}")))?;
        out.push((name.clone(), unserialize(&raw).map_err(|e| candle_core::Error::Msg(format!("lazy-load database, '{name}': {e}")))?));
    }
    Ok(out)
}

/// One blob of a lazy-load database (R's `lazyLoadDBinsertValue`): compression 0 stores the
/// serialization; 1 is a 4-byte big-endian length + zlib; 2 and 3 add a type byte after the length
/// ('0' stored, '1' zlib, '2' bzip2, 'Z' raw LZMA2 / xz).
fn lazy_load_blob(blob: &[u8], compressed: i64) -> Result<Vec<u8>> {
    if compressed == 0 {
        return Ok(blob.to_vec());
    }
    if blob.len() < 5 {
        bail!("blob of {} bytes is too short", blob.len());
    }
    let want = u32::from_be_bytes(blob[..4].try_into().unwrap()) as usize;
    let (kind, data) = if compressed == 1 { (b'1', &blob[4..]) } else { (blob[4], &blob[5..]) };
    let mut out = Vec::with_capacity(want);
    match kind {
        b'0' => out.extend_from_slice(data),
        b'1' => {
            flate2::read::ZlibDecoder::new(data).read_to_end(&mut out).map_err(|e| candle_core::Error::Msg(format!("zlib: {e}")))?;
        }
        b'2' => {
            bzip2::read::BzDecoder::new(data).read_to_end(&mut out).map_err(|e| candle_core::Error::Msg(format!("bzip2: {e}")))?;
        }
        b'Z' => {
            if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
                out = decompress(data)?;
            } else {
                lzma_rs::lzma2_decompress(&mut std::io::BufReader::new(data), &mut out).map_err(|e| candle_core::Error::Msg(format!("lzma2: {e:?}")))?;
            }
        }
        k => bail!("unknown compression type byte {k:#04x} (lazy-load compression {compressed})"),
    }
    if out.len() != want {
        bail!("decompressed to {} bytes, the header says {want}", out.len());
    }
    Ok(out)
}

// SEXP types (R's Rinternals.h) and serialization pseudo-types (serialize.c).
const SYMSXP: u32 = 1;
const LISTSXP: u32 = 2;
const CLOSXP: u32 = 3;
const ENVSXP: u32 = 4;
const PROMSXP: u32 = 5;
const LANGSXP: u32 = 6;
const SPECIALSXP: u32 = 7;
const BUILTINSXP: u32 = 8;
const CHARSXP: u32 = 9;
const LGLSXP: u32 = 10;
const INTSXP: u32 = 13;
const REALSXP: u32 = 14;
const CPLXSXP: u32 = 15;
const STRSXP: u32 = 16;
const DOTSXP: u32 = 17;
const VECSXP: u32 = 19;
const EXPRSXP: u32 = 20;
const BCODESXP: u32 = 21;
const EXTPTRSXP: u32 = 22;
const WEAKREFSXP: u32 = 23;
const RAWSXP: u32 = 24;
const S4SXP: u32 = 25;
const REFSXP: u32 = 255;
const NILVALUE_SXP: u32 = 254;
const GLOBALENV_SXP: u32 = 253;
const UNBOUNDVALUE_SXP: u32 = 252;
const MISSINGARG_SXP: u32 = 251;
const BASENAMESPACE_SXP: u32 = 250;
const NAMESPACESXP: u32 = 249;
const PACKAGESXP: u32 = 248;
const PERSISTSXP: u32 = 247;
const EMPTYENV_SXP: u32 = 242;
const BASEENV_SXP: u32 = 241;
const ATTRLANGSXP: u32 = 240;
const ATTRLISTSXP: u32 = 239;
const ALTREP_SXP: u32 = 238;

const HAS_ATTR: u32 = 1 << 9;
const HAS_TAG: u32 = 1 << 10;
// CHARSXP encoding bits (in the `levels` field, flags >> 12).
const LATIN1_MASK: u32 = 1 << 2;
const UTF8_MASK: u32 = 1 << 3;
const ASCII_MASK: u32 = 1 << 6;

const MAX_DEPTH: usize = 1000;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    refs: Vec<RValue>,
    /// The writer's native encoding is Latin-1 (strings not marked UTF-8/ASCII are converted).
    latin1: bool,
    depth: usize,
}

fn latin1_to_string(b: &[u8]) -> String {
    b.iter().map(|&c| c as char).collect()
}

fn is_pairlist(ty: u32) -> bool {
    matches!(ty, LISTSXP | CLOSXP | PROMSXP | LANGSXP | DOTSXP | ATTRLANGSXP | ATTRLISTSXP)
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() - self.pos < n {
            bail!("R serialization truncated at byte {} (wanted {n} more bytes, {} left)", self.pos, self.b.len() - self.pos);
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn int(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn real(&mut self) -> Result<f64> {
        Ok(f64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A vector length (-1 announces a long length in two more ints); checked against the bytes left,
    /// assuming at least `min_elem` bytes per element, so a corrupt length fails instead of allocating.
    fn vec_len(&mut self, min_elem: usize) -> Result<usize> {
        let n = match self.int()? {
            -1 => {
                let hi = self.int()? as u32 as u64;
                let lo = self.int()? as u32 as u64;
                (hi << 32 | lo) as usize
            }
            n if n >= 0 => n as usize,
            n => bail!("R serialization: negative length {n} at byte {}", self.pos - 4),
        };
        if n.saturating_mul(min_elem) > self.b.len() - self.pos {
            bail!("R serialization: length {n} at byte {} exceeds the data left", self.pos);
        }
        Ok(n)
    }

    fn len_of(&mut self, what: &str) -> Result<usize> {
        let n = self.int()?;
        if n < 0 {
            bail!("R serialization: negative {what} length {n}");
        }
        Ok(n as usize)
    }

    fn item(&mut self) -> Result<RValue> {
        let flags = self.int()? as u32;
        self.item_with_flags(flags)
    }

    fn item_with_flags(&mut self, flags: u32) -> Result<RValue> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            bail!("R serialization nested deeper than {MAX_DEPTH}");
        }
        let v = self.item_inner(flags);
        self.depth -= 1;
        v
    }

    /// A string vector written by `OutStringVec` (persistent names, namespaces, packages).
    fn string_vec(&mut self) -> Result<Vec<Option<String>>> {
        if self.int()? != 0 {
            bail!("R serialization: names in persistent strings are not supported");
        }
        let n = self.vec_len(4)?;
        (0..n)
            .map(|_| match self.item()?.data {
                RData::Str(mut s) if s.len() == 1 => Ok(s.pop().unwrap()),
                other => err(format!("R serialization: expected a string, found {}", other.type_name())),
            })
            .collect()
    }

    fn charsxp(&mut self, flags: u32) -> Result<Option<String>> {
        let levels = flags >> 12;
        let s = match self.int()? {
            -1 => None,
            n if n >= 0 => {
                let b = self.take(n as usize)?;
                Some(if levels & (UTF8_MASK | ASCII_MASK) == 0 && (levels & LATIN1_MASK != 0 || self.latin1) {
                    latin1_to_string(b)
                } else {
                    String::from_utf8_lossy(b).into_owned()
                })
            }
            n => bail!("R serialization: bad string length {n}"),
        };
        if flags & HAS_ATTR != 0 {
            self.item()?; // old writers attached attributes to CHARSXPs; R ignores them too
        }
        Ok(s)
    }

    fn attributes(&mut self, flags: u32) -> Result<Vec<(String, RValue)>> {
        if flags & HAS_ATTR == 0 {
            return Ok(Vec::new());
        }
        match self.item()?.data {
            RData::Pairlist(cells) => Ok(cells.into_iter().map(|(t, v)| (t.unwrap_or_default(), v)).collect()),
            RData::Null => Ok(Vec::new()),
            other => err(format!("R serialization: attributes are a {}, expected a pairlist", other.type_name())),
        }
    }

    fn tag_name(v: RValue) -> Option<String> {
        match v.data {
            RData::Sym(s) => Some(s),
            RData::Str(mut s) if s.len() == 1 => s.pop().unwrap(),
            _ => None,
        }
    }

    fn item_inner(&mut self, flags: u32) -> Result<RValue> {
        let ty = flags & 0xff;
        let data = match ty {
            NILVALUE_SXP => return Ok(RValue::new(RData::Null)),
            GLOBALENV_SXP => return Ok(RValue::new(RData::Env("R_GlobalEnv"))),
            EMPTYENV_SXP => return Ok(RValue::new(RData::Env("R_EmptyEnv"))),
            BASEENV_SXP => return Ok(RValue::new(RData::Env("base"))),
            BASENAMESPACE_SXP => return Ok(RValue::new(RData::Env("namespace:base"))),
            UNBOUNDVALUE_SXP => return Ok(RValue::new(RData::Env("R_UnboundValue"))),
            MISSINGARG_SXP => return Ok(RValue::new(RData::Env("R_MissingArg"))),
            REFSXP => {
                let i = match flags >> 8 {
                    0 => self.int()? as usize,
                    i => i as usize,
                };
                return match self.refs.get(i.wrapping_sub(1)) {
                    Some(v) => Ok(v.clone()),
                    None => err(format!("R serialization: reference {i} to an unread object ({} read)", self.refs.len())),
                };
            }
            PERSISTSXP | NAMESPACESXP | PACKAGESXP => {
                let v = RValue::new(RData::Persistent(self.string_vec()?));
                self.refs.push(v.clone());
                return Ok(v);
            }
            SYMSXP => {
                let name = match self.item()?.data {
                    RData::Str(mut s) if s.len() == 1 => s.pop().unwrap().unwrap_or_else(|| "NA".into()),
                    other => bail!("R serialization: symbol name is a {}", other.type_name()),
                };
                let v = RValue::new(RData::Sym(name));
                self.refs.push(v.clone());
                return Ok(v);
            }
            ENVSXP => {
                let _locked = self.int()?;
                let v = RValue::new(RData::Env("environment"));
                self.refs.push(v.clone());
                for _ in 0..4 {
                    self.item()?; // enclosure, frame, hash table, attributes
                }
                return Ok(v);
            }
            t if is_pairlist(t) => return self.pairlist(flags),
            ALTREP_SXP => return self.altrep(),
            CHARSXP => return Ok(RValue::new(RData::Str(vec![self.charsxp(flags)?]))),
            LGLSXP | INTSXP => {
                let n = self.vec_len(4)?;
                let v = (0..n).map(|_| self.int()).collect::<Result<Vec<_>>>()?;
                if ty == LGLSXP {
                    RData::Lgl(v)
                } else {
                    RData::Int(v)
                }
            }
            REALSXP => {
                let n = self.vec_len(8)?;
                RData::Real((0..n).map(|_| self.real()).collect::<Result<_>>()?)
            }
            CPLXSXP => {
                let n = self.vec_len(16)?;
                RData::Cplx((0..n).map(|_| Ok((self.real()?, self.real()?))).collect::<Result<_>>()?)
            }
            STRSXP => {
                let n = self.vec_len(8)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let f = self.int()? as u32;
                    if f & 0xff != CHARSXP {
                        bail!("R serialization: character vector element of type {}", f & 0xff);
                    }
                    v.push(self.charsxp(f)?);
                }
                RData::Str(v)
            }
            VECSXP | EXPRSXP => {
                let n = self.vec_len(4)?;
                RData::List((0..n).map(|_| self.item()).collect::<Result<_>>()?)
            }
            RAWSXP => {
                let n = self.vec_len(1)?;
                RData::Raw(self.take(n)?.to_vec())
            }
            S4SXP => RData::S4,
            SPECIALSXP | BUILTINSXP => {
                let n = self.len_of("builtin name")?;
                RData::Builtin(String::from_utf8_lossy(self.take(n)?).into_owned())
            }
            EXTPTRSXP => {
                self.refs.push(RValue::new(RData::Pointer));
                self.item()?; // protected value
                self.item()?; // tag
                RData::Pointer
            }
            WEAKREFSXP => {
                self.refs.push(RValue::new(RData::Pointer));
                RData::Pointer
            }
            BCODESXP => bail!("R serialization: byte code (BCODESXP) is not supported"),
            t => bail!("R serialization: unsupported SEXP type {t} at byte {}", self.pos - 4),
        };
        let attrs = self.attributes(flags)?;
        Ok(RValue { data, attrs })
    }

    /// A pairlist, read iteratively along its CDRs: each cell is [attributes] [tag] CAR, then the CDR.
    fn pairlist(&mut self, mut flags: u32) -> Result<RValue> {
        let mut cells = Vec::new();
        let mut attrs = None;
        loop {
            let a = self.attributes(flags)?;
            if attrs.is_none() {
                attrs = Some(a);
            }
            if flags & 0xff == ATTRLANGSXP || flags & 0xff == ATTRLISTSXP {
                bail!("R serialization: old-style ATTRLANGSXP/ATTRLISTSXP is not supported");
            }
            let tag = if flags & HAS_TAG != 0 { Self::tag_name(self.item()?) } else { None };
            let car = self.item()?;
            cells.push((tag, car));
            let next = self.int()? as u32;
            match next & 0xff {
                LISTSXP => flags = next,
                NILVALUE_SXP => break,
                _ => {
                    // A dotted pair: keep the CDR as an untagged last cell.
                    let cdr = self.item_with_flags(next)?;
                    cells.push((None, cdr));
                    break;
                }
            }
        }
        Ok(RValue { data: RData::Pairlist(cells), attrs: attrs.unwrap_or_default() })
    }

    /// An ALTREP object: (class, package, type) info, the class's serialized state, attributes.
    fn altrep(&mut self) -> Result<RValue> {
        let info = self.item()?;
        let state = self.item()?;
        let attr = self.item()?;
        let class = match &info.data {
            RData::Pairlist(cells) => match cells.first().map(|c| &c.1.data) {
                Some(RData::Sym(s)) => s.clone(),
                _ => bail!("R serialization: ALTREP info without a class symbol"),
            },
            _ => bail!("R serialization: ALTREP info is not a pairlist"),
        };
        let data = match class.as_str() {
            "compact_intseq" | "compact_realseq" => {
                let s = match &state.data {
                    RData::Real(s) if s.len() == 3 => s.clone(),
                    RData::Int(s) if s.len() == 3 => s.iter().map(|&x| x as f64).collect(),
                    _ => bail!("R serialization: bad {class} state"),
                };
                let (n, n1, inc) = (s[0], s[1], s[2]);
                if !(0.0..=(self.b.len() as f64 * 64.0 + 1e6)).contains(&n) {
                    bail!("R serialization: {class} of implausible length {n}");
                }
                let n = n as usize;
                if class == "compact_intseq" {
                    RData::Int((0..n).map(|i| (n1 + i as f64 * inc) as i32).collect())
                } else {
                    RData::Real((0..n).map(|i| n1 + i as f64 * inc).collect())
                }
            }
            c if c.starts_with("wrap_") => match state.data {
                RData::Pairlist(mut cells) if !cells.is_empty() => cells.swap_remove(0).1.data,
                _ => bail!("R serialization: bad {class} state"),
            },
            "deferred_string" => {
                let arg = match &state.data {
                    RData::Pairlist(cells) if !cells.is_empty() => &cells[0].1,
                    _ => bail!("R serialization: bad deferred_string state"),
                };
                match &arg.data {
                    RData::Int(v) => RData::Str(v.iter().map(|&x| (x != NA_INTEGER).then(|| x.to_string())).collect()),
                    RData::Real(v) if v.iter().all(|x| x.is_nan() || (x.fract() == 0.0 && x.abs() < 1e15)) => {
                        RData::Str(v.iter().map(|&x| (!x.is_nan()).then(|| format!("{}", x as i64))).collect())
                    }
                    other => bail!("R serialization: deferred_string of {} values is not supported", other.type_name()),
                }
            }
            c => bail!("R serialization: ALTREP class '{c}' is not supported"),
        };
        let attrs = match attr.data {
            RData::Pairlist(cells) => cells.into_iter().map(|(t, v)| (t.unwrap_or_default(), v)).collect(),
            _ => Vec::new(),
        };
        Ok(RValue { data, attrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// A hand-assembled XDR stream: `list(a = c(1L, NA), s = c("x", NA))`, version 2.
    #[test]
    fn hand_made_list() {
        let mut b = b"X\n".to_vec();
        let int = |b: &mut Vec<u8>, v: i32| b.extend_from_slice(&v.to_be_bytes());
        for v in [2, 0x040202, 0x020300] {
            int(&mut b, v);
        }
        int(&mut b, 0x213); // VECSXP with attributes
        int(&mut b, 2);
        int(&mut b, 13); // INTSXP
        int(&mut b, 2);
        int(&mut b, 1);
        int(&mut b, i32::MIN);
        int(&mut b, 16); // STRSXP
        int(&mut b, 2);
        int(&mut b, 0x40009); // CHARSXP, ASCII
        int(&mut b, 1);
        b.push(b'x');
        int(&mut b, 9);
        int(&mut b, -1); // NA_STRING
        int(&mut b, 0x402); // attributes: LISTSXP with tag
        int(&mut b, 1); // SYMSXP
        int(&mut b, 0x40009);
        int(&mut b, 5);
        b.extend_from_slice(b"names");
        int(&mut b, 16);
        int(&mut b, 2);
        for s in ["a", "s"] {
            int(&mut b, 0x40009);
            int(&mut b, 1);
            b.extend_from_slice(s.as_bytes());
        }
        int(&mut b, 254); // end of attributes
        let v = unserialize(&b).unwrap();
        assert_eq!(v.names().unwrap(), vec![Some("a".into()), Some("s".into())]);
        assert_eq!(v.get("a").unwrap().data, RData::Int(vec![1, NA_INTEGER]));
        assert_eq!(v.get("s").unwrap().data, RData::Str(vec![Some("x".into()), None]));
        // Truncations fail cleanly, never panic.
        for cut in 0..b.len() {
            assert!(unserialize(&b[..cut]).is_err());
        }
        // A reference to the "names" symbol (index 1) read back as a second attribute tag.
        let mut c = b[..b.len() - 4].to_vec();
        int(&mut c, 0x402);
        int(&mut c, 0x1ff); // REFSXP, index 1
        int(&mut c, 10);
        int(&mut c, 1);
        int(&mut c, 1);
        int(&mut c, 254);
        let v = unserialize(&c).unwrap();
        assert_eq!(v.attrs[1], ("names".to_string(), RValue::new(RData::Lgl(vec![1]))));
    }

    // The fixtures below are R 4.2.2's own output (hex of `serialize()`, `saveRDS()` and
    // `tools:::makeLazyLoadDB()` files), made by:
    // x <- list(a = 1:3, b = c("x", NA, "\u00e9"), f = factor(c("u", "v", "u")), r = c(1.5, NA, -Inf),
    //           l = c(TRUE, NA, FALSE), n = NULL)
    // X_V3 / X_V2: serialize(x, NULL, version = 3 / 2)
    // DF_XZ / DF_BZ / DF_GZ: saveRDS(data.frame(s = c("ACG", "TTA"),
    //     k = factor(c("EI", "N"), levels = c("EI", "IE", "N"))), f, compress = "xz" / "bzip2" / "gzip")
    // LATIN1: serialize(iconv("caf\u00e9", "UTF-8", "latin1"), NULL, version = 2)
    // ENV: e <- new.env(); assign("q", 2L, e); serialize(list(e = e, e2 = e, g = globalenv(), s = quote(sym)), NULL, version = 3)
    // WRAP: serialize(.Internal(wrap_meta(c(3L, 4L), 0L, 0L)), NULL, version = 3)
    // DSTR: serialize(as.character(101:103), NULL, version = 3)
    // LAZY<c>_RDX/RDB: env with alpha = c(rep("one", 100), "two"), beta = 7:9;
    //     tools:::makeLazyLoadDB(env, f, compress = TRUE / 2L / 3L)
    const X_V3: &str = concat!(
        "580a000000030004020200030500000000055554462d380000021300000006000000ee000000020000000100040009000000",
        "0e636f6d706163745f696e747365710000000200000001000400090000000462617365000000020000000d00000001000000",
        "0d000000fe0000000e0000000340080000000000003ff00000000000003ff0000000000000000000fe000000100000000300",
        "040009000000017800000009ffffffff0000800900000002c3a90000030d0000000300000001000000020000000100000402",
        "0000000100040009000000066c6576656c730000001000000002000400090000000175000400090000000176000004020000",
        "00010004000900000005636c61737300000010000000010004000900000006666163746f72000000fe0000000e000000033f",
        "f80000000000007ff00000000007a2fff00000000000000000000a00000003000000018000000000000000000000fe000004",
        "020000000100040009000000056e616d65730000001000000006000400090000000161000400090000000162000400090000",
        "00016600040009000000017200040009000000016c00040009000000016e000000fe",
    );
    const X_V2: &str = concat!(
        "580a00000002000402020002030000000213000000060000000d000000030000000100000002000000030000001000000003",
        "00040009000000017800000009ffffffff0000800900000002c3a90000030d00000003000000010000000200000001000004",
        "020000000100040009000000066c6576656c7300000010000000020004000900000001750004000900000001760000040200",
        "0000010004000900000005636c61737300000010000000010004000900000006666163746f72000000fe0000000e00000003",
        "3ff80000000000007ff00000000007a2fff00000000000000000000a00000003000000018000000000000000000000fe0000",
        "04020000000100040009000000056e616d657300000010000000060004000900000001610004000900000001620004000900",
        "0000016600040009000000017200040009000000016c00040009000000016e000000fe",
    );
    const DF_XZ: &str = concat!(
        "fd377a585a0000016922de360200210116000000742fe5a3e0013400935d002c027c19f9aff41d3b9e98357eead0f4214db3",
        "4552c6bd9a3d142ed810de0799d00797ea1ae4d486f5a715d0d481ead414a8db2878bfcdf52d8906856e5d5ba1feadaad43f",
        "241d2f42844a0acc3def479336c9f5646420d418fdd8e1e31e75791e401d5456d27d8850fa51b02170a6783c675d0f4473da",
        "75336e8e94491590e93d4e3f87558116031de59c98508dda5505ad000000692a71c40001ab01b50200008676c6a43e300d8b",
        "020000000001595a",
    );
    const DF_BZ: &str = concat!(
        "425a6839314159265359fd2fb1ce0000827fc0ff324800000300402ba106402f0f9d8040000001a00092104247a9b53c8232",
        "18d3121bd26824514f4d26401a0190007a92715631d6acb62448ce36e226c5e4a3c6fd52934049abae81c6ad3dbc49082b61",
        "c3246abe17eb14d1268dc84c4860dca041a42292110081208049f1a3e35796b151b52e54970c38ff9cc0cfaf894e841d0e77",
        "7099761aabb1d4b4d7b135ac06a97e8e20840239177245385090fd2fb1ce",
    );
    const DF_GZ: &str = concat!(
        "1f8b08000000000000038be06260606066606162626066053219584343dc742d8062c2400e13100b806916064e9042476777",
        "183324c41148f2425531828d019a03664394b0e5a496a5e61443cd60868a32b97ac2589eae5016a31f9a56d6e49cc462984e",
        "b8796989c925f94540d63f74e57989b9a9c5688e652c8631b221ca99fea319c895925892a8975604d48c662067517eb91ecc",
        "50b01f1b80c4ffffffff816c0700692a71c435010000",
    );
    const LATIN1: &str = "580a00000002000402020002030000000010000000010000400900000004636166e9";
    const ENV: &str = concat!(
        "580a000000030004020200030500000000055554462d3800000213000000040000000400000000000000fd000000fe000000",
        "130000001d000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe00",
        "0000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000fe000000",
        "fe000000fe000000fe00000402000000010004000900000001710000000d0000000100000002000000fe000000fe000000fe",
        "000000fe000001ff000000fd00000001000400090000000373796d000004020000000100040009000000056e616d65730000",
        "00100000000400040009000000016500040009000000026532000400090000000167000400090000000173000000fe",
    );
    const WRAP: &str = concat!(
        "580a000000030004020200030500000000055554462d38000000ee0000000200000001000400090000000c777261705f696e",
        "74656765720000000200000001000400090000000462617365000000020000000d000000010000000d000000fe0000000200",
        "00000d0000000200000003000000040000000d000000020000000000000000000000fe",
    );
    const DSTR: &str = concat!(
        "580a000000030004020200030500000000055554462d38000000ee0000000200000001000400090000000f64656665727265",
        "645f737472696e670000000200000001000400090000000462617365000000020000000d0000000100000010000000fe0000",
        "0002000000ee0000000200000001000400090000000e636f6d706163745f696e7473657100000002000002ff000000020000",
        "000d000000010000000d000000fe0000000e00000003400800000000000040594000000000003ff0000000000000000000fe",
        "0000000d0000000100000000000000fe",
    );
    const LAZY1_RDX: &str = concat!(
        "1f8b0800000000000003558dd10ac2300c45efdaee610541f03b7c177cf70b14f6246433a2b0cdd18a9f3f4ddb805a08f7e6",
        "263d693d000b670c6c2d16f5e978d8ee00b3c983a2466aa59adefea74ffe0c21885670681264a291a398755ed29086f946da",
        "b88e9f24bae8051442f5d64f2833f84ccdf537b7ca695e14eed40d72ad043ef095034ffd37e91fe31c3846be24e8074e3a00",
        "c4f2000000",
    );
    const LAZY1_RDB: &str = concat!(
        "00000476789c8be06260606066606162626066053219584343dc742d800c01204e656061e00429c8cf1b658e324799a34cca",
        "9925e5f900b68a87b600000085789c8be06260606066606162626066053219584343dc742d808c7740cc04c48c0c2c0c9c40",
        "9a2f393fb72031b9243e33afa438b5104d962529b138152ac60b1687d0ff403a41563870308081830c84b6ffc00003ff00d8",
        "5f0e61",
    );
    const LAZY2_RDX: &str = concat!(
        "1f8b0800000000000003554d5b0ac230109c3cfad18220780eff3d812750f0775bd707b4b524e2017af0ea2659501796999d",
        "49664e0d00076f2d5c2514d5f1b0dfee00bbc946412bbb524c73fdb9139f210982061e750a1969e028649d1fa948fd74233d",
        "7ccb4f125cb40125c1bcf5138a975b4c69faf39de6d42f0a776a7b692b4213f8c281c7eeab748f610a1c239f53e80775747e",
        "70f2000000",
    );
    const LAZY2_RDB: &str = concat!(
        "0000047632425a683931415926535990397b490001a37f805e304000000200400100064002018480200050a64c4c83230451",
        "4d34c8d3434a456a88337b4888d61107288369ba20c1499450768141cc631de73ed7d0419041d72883afc5dc914e1424240e",
        "5ed2400000008532425a6839314159265359317c02c5000034ff81fe73000400020040c1000640ba23ec0000014001200054",
        "354f50340d003d20d0cf541a4693d21ea69a0000344caf392bc772dd05718987c3e75ca8011231058d2b43002735a401b06a",
        "81c804bbecca515cb818befd1e4786108f6cba72a532fc5dc914e14240c5f00b14",
    );
    const LAZY3_RDX: &str = concat!(
        "1f8b0800000000000003554ecb0ac230109c3c7a684110fc0eef9e3cfa050abdc9b6ae28b4b524e2e75737c9821a08333bb3",
        "9949db0070f0d6c25542519d8e87ed0eb09b6c14b472578ae9ec7fe6c4cf900441038f3a854c347214b2ce4b2ad230df4807",
        "dff19304176d4049306f7d84e2e516537ef2e73bcda95f14eed40dd2568426f095034ffd57e91fe31c3846bea4d00f29bbff",
        "bdf2000000",
    );
    const LAZY3_RDB: &str = concat!(
        "000004765ae0047500315d002c027c19f9aff41d3b9e98357eead0f4214db34552c4c13a878933bd882735f58ccce7f7f545",
        "a0e8520a2dcde3620d98a000000000855ae0008400525d002c027c19f9aff41d3b9e98357eead0f4214db34552c4d4d60cb4",
        "a2c0a44766326a30b854c06fbb9c780f67fcbe2dbb598dc75c76ae4aa5c49dcaeddfdf5cd1f373d6797326ec54c159d1e3f4",
        "143c3356a87700",
    );

    fn check_x(v: &RValue) {
        assert_eq!(v.names().unwrap().iter().flatten().map(|s| s.as_str()).collect::<Vec<_>>(), ["a", "b", "f", "r", "l", "n"]);
        assert_eq!(v.get("a").unwrap().data, RData::Int(vec![1, 2, 3]));
        assert_eq!(v.get("b").unwrap().data, RData::Str(vec![Some("x".into()), None, Some("é".into())]));
        assert_eq!(v.get("f").unwrap().factor_labels().unwrap(), vec![Some("u"), Some("v"), Some("u")]);
        match &v.get("r").unwrap().data {
            RData::Real(r) => assert!(r[0] == 1.5 && r[1].is_nan() && r[2] == f64::NEG_INFINITY),
            d => panic!("{d:?}"),
        }
        assert_eq!(v.get("l").unwrap().data, RData::Lgl(vec![1, NA_INTEGER, 0]));
        assert_eq!(v.get("n").unwrap().data, RData::Null);
    }

    #[test]
    fn r_serialize_v2_and_v3_with_altrep() {
        check_x(&unserialize(&hex(X_V3)).unwrap()); // 1:3 is an ALTREP compact_intseq in version 3
        check_x(&unserialize(&hex(X_V2)).unwrap());
        let b = hex(X_V3);
        for cut in 0..b.len() {
            assert!(unserialize(&b[..cut]).is_err(), "truncated at {cut}");
        }
    }

    #[test]
    fn compressed_rds_data_frames() {
        for f in [DF_XZ, DF_BZ, DF_GZ] {
            let df = read_rds(&hex(f)).unwrap();
            assert_eq!(df.class(), ["data.frame"]);
            assert_eq!(df.get("s").unwrap().data, RData::Str(vec![Some("ACG".into()), Some("TTA".into())]));
            assert_eq!(df.get("k").unwrap().factor_labels().unwrap(), vec![Some("EI"), Some("N")]);
            assert_eq!(df.attr("row.names").unwrap().data, RData::Int(vec![NA_INTEGER, -2]));
        }
    }

    #[test]
    fn latin1_env_refs_wrappers_deferred_strings() {
        assert_eq!(unserialize(&hex(LATIN1)).unwrap().data, RData::Str(vec![Some("café".into())]));
        let v = unserialize(&hex(ENV)).unwrap();
        assert_eq!(v.get("e").unwrap().data, RData::Env("environment"));
        assert_eq!(v.get("e2").unwrap().data, RData::Env("environment")); // a REFSXP to `e`
        assert_eq!(v.get("g").unwrap().data, RData::Env("R_GlobalEnv"));
        assert_eq!(v.get("s").unwrap().data, RData::Sym("sym".into()));
        assert_eq!(unserialize(&hex(WRAP)).unwrap().data, RData::Int(vec![3, 4]));
        let d = unserialize(&hex(DSTR)).unwrap();
        assert_eq!(d.data, RData::Str(["101", "102", "103"].iter().map(|s| Some(s.to_string())).collect()));
    }

    #[test]
    fn lazy_load_databases_all_compressions() {
        for (rdx, rdb) in [(LAZY1_RDX, LAZY1_RDB), (LAZY2_RDX, LAZY2_RDB), (LAZY3_RDX, LAZY3_RDB)] {
            let mut vars = read_lazy_load_db(&hex(rdx), &hex(rdb)).unwrap();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(vars.len(), 2);
            assert_eq!(vars[0].0, "alpha");
            let a = vars[0].1.strings().unwrap();
            assert_eq!((a.len(), a[0].as_deref(), a[100].as_deref()), (101, Some("one"), Some("two")));
            assert_eq!(vars[1], ("beta".to_string(), RValue::new(RData::Int(vec![7, 8, 9]))));
        }
        // A blob cut short is an error, not a panic.
        let rdb = hex(LAZY1_RDB);
        assert!(read_lazy_load_db(&hex(LAZY1_RDX), &rdb[..rdb.len() - 3]).is_err());
    }

    #[test]
    fn rda_header_and_errors() {
        let mut rda = b"RDX2\n".to_vec();
        let x = hex(X_V2);
        rda.extend_from_slice(&x[..x.len() - 4]);
        assert!(read_rda(&rda).is_err()); // a list, not a pairlist of objects
        // save(x, file = f, version = 2) writes RDX2 + a tagged pairlist: build one around X_V2's list.
        let mut rda = b"RDX2\nX\n".to_vec();
        rda.extend_from_slice(&x[2..14]);
        rda.extend_from_slice(&0x402i32.to_be_bytes());
        rda.extend_from_slice(&1i32.to_be_bytes());
        rda.extend_from_slice(&0x40009i32.to_be_bytes());
        rda.extend_from_slice(&1i32.to_be_bytes());
        rda.push(b'x');
        rda.extend_from_slice(&x[14..]);
        rda.extend_from_slice(&254i32.to_be_bytes());
        let objs = read_rda(&rda).unwrap();
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].0, "x");
        check_x(&objs[0].1);
        assert!(unserialize(b"A\n2\n").unwrap_err().to_string().contains("ASCII"));
        assert!(read_rda(b"RDA2\nA\n").unwrap_err().to_string().contains("not supported"));
    }
}
