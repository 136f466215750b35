//! A synthetic reasoning task with checkable answers: multi-step arithmetic with worked solutions, for
//! test-time-compute experiments (`ouro sample`: pass@k and majority vote under a time budget).
//!
//! A problem is a chain of 2–4 additions and subtractions of small numbers, written as
//! `Q: 17+25-8= A: 17+25=42 42-8=34 #### 34` — the question, then one worked step per operation (left to
//! right), then the answer after `####` (the default answer rule of `ouro sample`). Subtractions never go
//! below zero. The training corpus is one problem per line in several .txt documents (so that `ouro train`
//! can hold whole documents out); the held-out prompts (`test.jsonl`, `{"id", "prompt", "answer"}`) are
//! problems whose question does not occur in the corpus.

use candle_core::{bail, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How problems are drawn.
#[derive(Clone, Debug, PartialEq)]
pub struct ArithSpec {
    /// Operands are drawn from 1..=max_operand.
    pub max_operand: u32,
    /// Operations per problem, drawn uniformly from min_ops..=max_ops.
    pub min_ops: usize,
    pub max_ops: usize,
}

impl Default for ArithSpec {
    fn default() -> Self {
        ArithSpec { max_operand: 20, min_ops: 2, max_ops: 4 }
    }
}

/// One problem: operands and operators (`b'+'` or `b'-'`), left to right.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    pub operands: Vec<u32>,
    pub ops: Vec<u8>,
}

impl Problem {
    /// Draws a problem; a subtraction that would go below zero becomes an addition.
    pub fn random(spec: &ArithSpec, rng: &mut StdRng) -> Self {
        let n_ops = rng.random_range(spec.min_ops..=spec.max_ops);
        let mut acc = rng.random_range(1..=spec.max_operand);
        let (mut operands, mut ops) = (vec![acc], Vec::with_capacity(n_ops));
        for _ in 0..n_ops {
            let x = rng.random_range(1..=spec.max_operand);
            let op = if rng.random_bool(0.5) && x <= acc { b'-' } else { b'+' };
            acc = if op == b'-' { acc - x } else { acc + x };
            operands.push(x);
            ops.push(op);
        }
        Problem { operands, ops }
    }

    /// The intermediate results, one per operation; the last is the answer.
    pub fn steps(&self) -> Vec<i64> {
        let mut acc = self.operands[0] as i64;
        self.ops
            .iter()
            .zip(&self.operands[1..])
            .map(|(&op, &x)| {
                acc = if op == b'-' { acc - x as i64 } else { acc + x as i64 };
                acc
            })
            .collect()
    }

    pub fn answer(&self) -> i64 {
        *self.steps().last().expect("a problem has at least one operation")
    }

    /// `17+25-8=`
    pub fn expression(&self) -> String {
        let mut s = self.operands[0].to_string();
        for (&op, x) in self.ops.iter().zip(&self.operands[1..]) {
            s.push(op as char);
            s.push_str(&x.to_string());
        }
        s.push('=');
        s
    }

    /// The prompt: `Q: 17+25-8= A:`
    pub fn prompt(&self) -> String {
        format!("Q: {} A:", self.expression())
    }

    /// The worked solution after the prompt: ` 17+25=42 42-8=34 #### 34`
    pub fn solution(&self) -> String {
        let mut s = String::new();
        let mut prev = self.operands[0] as i64;
        for ((&op, x), r) in self.ops.iter().zip(&self.operands[1..]).zip(self.steps()) {
            s.push_str(&format!(" {prev}{}{x}={r}", op as char));
            prev = r;
        }
        s.push_str(&format!(" #### {prev}"));
        s
    }

    /// One training line (no newline).
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt(), self.solution())
    }
}

/// Checks a worked solution line `a+b=c c-d=e … #### X`: every step's arithmetic, that each step starts
/// from the previous result, and that X is the last result. Returns X.
pub fn check_solution(solution: &str) -> Option<i64> {
    let (work, answer) = solution.rsplit_once("####")?;
    let answer: i64 = answer.trim().parse().ok()?;
    let mut prev: Option<i64> = None;
    for step in work.split_whitespace() {
        let (lhs, rhs) = step.split_once('=')?;
        let r: i64 = rhs.parse().ok()?;
        let at = lhs.get(1..)?.find(['+', '-'])? + 1;
        let (a, b): (i64, i64) = (lhs[..at].parse().ok()?, lhs[at + 1..].parse().ok()?);
        let v = if lhs.as_bytes()[at] == b'-' { a - b } else { a + b };
        if v != r || prev.is_some_and(|p| p != a) {
            return None;
        }
        prev = Some(r);
    }
    (prev? == answer).then_some(answer)
}

/// What `ouro data arithmetic` writes.
#[derive(Clone, Debug)]
pub struct ArithDataset {
    pub spec: ArithSpec,
    pub seed: u64,
    /// Training problems (one per line), spread over `documents` .txt files.
    pub train: usize,
    pub documents: usize,
    /// Held-out prompts in test.jsonl.
    pub test: usize,
}

impl Default for ArithDataset {
    fn default() -> Self {
        ArithDataset { spec: ArithSpec::default(), seed: 0, train: 100_000, documents: 20, test: 100 }
    }
}

/// Writes `dir/train/part-NNN.txt` (the corpus) and `dir/test.jsonl` (held-out prompts with answers, none
/// of whose questions is in the corpus). Returns the corpus folder.
pub fn write_dataset(dir: &Path, d: &ArithDataset) -> Result<PathBuf> {
    if d.train == 0 || d.documents == 0 || d.documents > d.train {
        bail!("arithmetic: need at least one training problem per document ({} problems, {} documents)", d.train, d.documents);
    }
    if d.spec.min_ops == 0 || d.spec.min_ops > d.spec.max_ops || d.spec.max_operand == 0 {
        bail!("arithmetic: operations must satisfy 1 ≤ min ≤ max and operands max ≥ 1");
    }
    let io = |p: &Path, e: std::io::Error| candle_core::Error::Msg(format!("{}: {e}", p.display()));
    let train_dir = dir.join("train");
    std::fs::create_dir_all(&train_dir).map_err(|e| io(&train_dir, e))?;
    let mut rng = StdRng::seed_from_u64(d.seed);
    let mut seen = HashSet::new();
    let per_doc = d.train.div_ceil(d.documents);
    let mut written = 0;
    for doc in 0..d.documents {
        let path = train_dir.join(format!("part-{doc:03}.txt"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| io(&path, e))?);
        for _ in 0..per_doc.min(d.train - written) {
            let p = Problem::random(&d.spec, &mut rng);
            writeln!(f, "{}", p.text()).map_err(|e| io(&path, e))?;
            seen.insert(p);
            written += 1;
        }
        f.flush().map_err(|e| io(&path, e))?;
    }
    // Held-out problems from their own stream, skipping any question the corpus holds or already drawn.
    let mut rng = StdRng::seed_from_u64(d.seed ^ 0x7e57_7e57);
    let path = dir.join("test.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(|e| io(&path, e))?);
    let (mut n, mut tries) = (0, 0usize);
    while n < d.test {
        tries += 1;
        if tries > 1000 * (d.test + 1) {
            bail!("arithmetic: could not draw {} held-out problems outside the corpus", d.test);
        }
        let p = Problem::random(&d.spec, &mut rng);
        if !seen.insert(p.clone()) {
            continue;
        }
        let line = serde_json::json!({"id": format!("arith-{n}"), "prompt": p.prompt(), "answer": p.solution().trim_start()});
        writeln!(f, "{line}").map_err(|e| io(&path, e))?;
        n += 1;
    }
    f.flush().map_err(|e| io(&path, e))?;
    Ok(train_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ouro_nn::sample::{reference_answer, AnswerRule};

    #[test]
    fn worked_chains_evaluate_and_parse() {
        let mut rng = StdRng::seed_from_u64(3);
        let spec = ArithSpec::default();
        for _ in 0..2000 {
            let p = Problem::random(&spec, &mut rng);
            assert!((2..=4).contains(&p.ops.len()));
            assert!(p.operands.iter().all(|&x| (1..=20).contains(&x)));
            assert!(p.steps().iter().all(|&s| s >= 0), "{}", p.text());
            // The expression evaluated independently, left to right.
            let mut v = p.operands[0] as i64;
            for (op, x) in p.ops.iter().zip(&p.operands[1..]) {
                v += if *op == b'-' { -(*x as i64) } else { *x as i64 };
            }
            assert_eq!(v, p.answer());
            assert_eq!(check_solution(&p.solution()), Some(v), "{}", p.text());
            // What `ouro sample` extracts from the completion (stopped at the newline) is the answer.
            let got = AnswerRule::Default.extract(&p.solution());
            assert_eq!(got.as_deref(), Some(reference_answer(&v.to_string()).as_str()));
        }
        let p = Problem { operands: vec![17, 25, 8], ops: vec![b'+', b'-'] };
        assert_eq!(p.text(), "Q: 17+25-8= A: 17+25=42 42-8=34 #### 34");
        assert_eq!(check_solution(" 17+25=42 42-8=35 #### 35"), None); // a wrong step
        assert_eq!(check_solution(" 17+25=42 41-8=33 #### 33"), None); // not chained
        assert_eq!(check_solution(" 17+25=42 42-8=34 #### 35"), None); // wrong final answer
    }

    #[test]
    fn dataset_holds_out_its_test_prompts() {
        let dir = std::env::temp_dir().join(format!("ouro-arith-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = ArithDataset { train: 500, documents: 4, test: 30, ..Default::default() };
        let train = write_dataset(&dir, &d).unwrap();
        let mut questions = HashSet::new();
        let mut lines = 0;
        for i in 0..4 {
            let text = std::fs::read_to_string(train.join(format!("part-{i:03}.txt"))).unwrap();
            for l in text.lines() {
                let (q, sol) = l.split_once(" A:").unwrap();
                assert!(check_solution(sol).is_some(), "{l}");
                questions.insert(q.to_string());
                lines += 1;
            }
        }
        assert_eq!(lines, 500);
        let test = std::fs::read_to_string(dir.join("test.jsonl")).unwrap();
        let rows: Vec<serde_json::Value> = test.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(rows.len(), 30);
        for r in &rows {
            let prompt = r["prompt"].as_str().unwrap();
            assert!(prompt.starts_with("Q: ") && prompt.ends_with(" A:"));
            assert!(!questions.contains(prompt.trim_end_matches(" A:")), "{prompt} is in the corpus");
            // The reference is a worked solution whose #### part `ouro sample` reads.
            let answer = r["answer"].as_str().unwrap();
            let v = check_solution(answer).unwrap();
            assert_eq!(reference_answer(answer), v.to_string());
        }
        // The same seed writes the same files.
        let again = dir.join("again");
        write_dataset(&again, &d).unwrap();
        assert_eq!(std::fs::read_to_string(again.join("test.jsonl")).unwrap(), test);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
