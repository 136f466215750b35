//! What every end-to-end test of the `ouro` binary needs: the binary, the fixtures, a run's outcome.

use std::path::PathBuf;
use std::process::Command;

pub fn ouro() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ouro"))
}

/// A path under the repository's tests/fixtures.
pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(p)
}

/// (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}
