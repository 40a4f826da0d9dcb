//! The model of the saga protocol (`model/saga.pml`, see `model/README.md`),
//! checked exhaustively by spin: without `FIXED` it finds the dead letter
//! redriven after a resolution that charges, reserves and ships an order
//! settled by hand; with `FIXED` every invariant holds in every reachable
//! state, the operator's resolution racing a redriven event and a
//! dead-lettered delivery coming again (its terminating ack lost) included.
//! Needs `spin` (Debian package `spin`, installed by scripts/test.sh) and
//! `gcc`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};

/// The model, wherever the tests run from.
fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/saga.pml")
}

/// A fresh directory holding a copy of the model: spin and pan write their
/// files next to it. Removed by [`Checked::done`] once the test passed; kept
/// for inspection when it fails.
struct Checked {
    dir: PathBuf,
}

impl Checked {
    fn new(name: &str) -> Result<Checked> {
        require_spin()?;
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "saga-model-{name}-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let source = model();
        std::fs::copy(&source, dir.join("saga.pml"))
            .with_context(|| format!("copying {} to {}", source.display(), dir.display()))?;
        Ok(Checked { dir })
    }

    /// Runs `program args` in the directory; its output, whatever its exit
    /// status (pan's report, not its status, says what it found).
    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        Command::new(program)
            .args(args)
            .current_dir(&self.dir)
            .output()
            .with_context(|| {
                format!(
                    "running {program} {} in {}",
                    args.join(" "),
                    self.dir.display()
                )
            })
    }

    /// Runs `program args` and fails unless it succeeds; its stdout and stderr.
    fn succeed(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self.run(program, args)?;
        let text = text(&out);
        ensure!(
            out.status.success(),
            "{program} {} failed ({}) in {}:\n{text}",
            args.join(" "),
            out.status,
            self.dir.display()
        );
        Ok(text)
    }

    /// Generates the verifier for the model with `defines` and compiles it:
    /// an exhaustive search of safety properties (assertions, end states).
    fn build(&self, defines: &[&str]) -> Result<()> {
        let mut args: Vec<&str> = vec!["-a"];
        args.extend_from_slice(defines);
        args.push("saga.pml");
        self.succeed("spin", &args)?;
        self.succeed("gcc", &["-O2", "-DSAFETY", "-o", "pan", "pan.c"])?;
        Ok(())
    }

    /// Runs the verifier; its report.
    fn pan(&self, args: &[&str]) -> Result<String> {
        let out = self.run("./pan", args)?;
        Ok(text(&out))
    }

    fn done(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fails, saying how to get spin, when it is not installed.
fn require_spin() -> Result<()> {
    match Command::new("spin").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => bail!(
            "`spin -V` failed ({}): {}; run scripts/test.sh, which installs spin (Debian package `spin`)",
            out.status,
            text(&out)
        ),
        Err(e) => bail!(
            "spin is not on PATH ({e}): run scripts/test.sh, which installs it \
             (or `apt-get install spin`), to check the model of the saga protocol"
        ),
    }
}

/// The number pan reports after `errors:`.
fn errors(report: &str) -> Result<u64> {
    let count = report
        .split("errors:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    count.with_context(|| format!("no error count in pan's report:\n{report}"))
}

/// The index of the first line after `from` that contains `needle`.
fn line_after(lines: &[&str], from: usize, needle: &str) -> Option<usize> {
    (from..lines.len()).find(|&i| lines[i].contains(needle))
}

#[test]
fn the_model_finds_todays_redrive_after_resolution_counterexample() -> Result<()> {
    let checked = Checked::new("today")?;

    // The whole model: a resolved saga moves again. Its first trail depends
    // on the interleaving the search meets first (the resolution racing a
    // redriven event, or a dead-lettered delivery coming again, reach a
    // resolved saga too).
    checked.build(&[])?;
    let report = checked.pan(&[])?;
    let count = errors(&report)?;
    ensure!(count >= 1, "pan found no error without FIXED:\n{report}");
    ensure!(
        report.contains("assertion violated a_resolved_saga_never_moves_again"),
        "expected a resolved saga to move again, pan says:\n{report}"
    );

    // The search narrowed (by a never claim, not a change of the protocol)
    // to the runs where no terminating ack is lost and the dead letter is
    // redriven only after the resolution: today's counterexample.
    checked.build(&["-DTODAYS_COUNTEREXAMPLE"])?;
    let report = checked.pan(&[])?;
    let count = errors(&report)?;
    ensure!(
        count >= 1,
        "pan found no error in today's runs without FIXED:\n{report}"
    );
    ensure!(
        report.contains("assertion violated a_resolved_saga_never_moves_again"),
        "expected a redrive to move a resolved saga, pan says:\n{report}"
    );
    ensure!(
        checked.dir.join("saga.pml.trail").exists(),
        "pan wrote no trail in {}:\n{report}",
        checked.dir.display()
    );

    // The trail, replayed: the story it tells (the model's MSC lines), in order.
    let replay = checked.succeed("spin", &["-t", "-DTODAYS_COUNTEREXAMPLE", "saga.pml"])?;
    ensure!(
        replay.contains("text of failed assertion: assert(a_resolved_saga_never_moves_again)"),
        "the trail does not end on the expected assertion:\n{replay}"
    );
    let lines: Vec<&str> = replay.lines().collect();
    let mut at = 0;
    for step in [
        "MSC: dead-lettered OrderPlaced",
        "MSC: order REQUIRES_INTERVENTION (halted by the dead letter)",
        "MSC: the operator resolves it MANUALLY_COMPENSATED",
        "MSC: the operator redrives OrderPlaced",
        "MSC: payment charges",
    ] {
        at = line_after(&lines, at, step).with_context(|| {
            format!("the counterexample should go on with `{step}`; its trail:\n{replay}")
        })? + 1;
    }

    // Not stopping at the first error: the redriven order is also shipped,
    // and its money does not add up.
    let all = checked.pan(&["-c0"])?;
    for broken in ["no_goods_shipped_unless_confirmed", "money_adds_up"] {
        ensure!(
            all.contains(&format!("assertion violated {broken}")),
            "expected `{broken}` to break too without FIXED:\n{all}"
        );
    }
    checked.done();
    Ok(())
}

#[test]
fn the_model_of_the_fixed_protocol_holds_every_invariant() -> Result<()> {
    let checked = Checked::new("fixed")?;
    checked.build(&["-DFIXED"])?;
    let report = checked.pan(&[])?;
    ensure!(
        errors(&report)? == 0,
        "the fixed protocol breaks an invariant:\n{report}"
    );
    ensure!(
        report.contains("Full statespace search for:"),
        "not a full state space search:\n{report}"
    );
    for incomplete in [
        "Search not completed",
        "max search depth too small",
        "Warning",
        "out of memory",
    ] {
        ensure!(
            !report.contains(incomplete),
            "the search was not complete ({incomplete}):\n{report}"
        );
    }

    // The races are in the search, not only in the model's text: pan lists
    // no lost terminating ack, nor a shipment reaching a resolved order
    // (only the races bring one there), among the statements it never
    // reached.
    let unreached = report
        .split_once("unreached in proctype")
        .map(|(_, rest)| rest)
        .with_context(|| format!("no list of unreached statements in pan's report:\n{report}"))?;
    for race in [
        "MSC: the terminating ack is lost",
        "an_ignored_shipment_is_called_off =",
    ] {
        ensure!(
            !unreached.contains(race),
            "the search never reached `{race}`:\n{report}"
        );
    }
    checked.done();
    Ok(())
}
