//! Progress of long work (a projection rebuilt, an audit, a bulk redrive, a
//! load run) for whoever waits on it: a bar on a terminal (indicatif), and
//! otherwise, where output goes to a log or CI, a plain line at every tenth
//! of the way and at the end.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};

/// Where progress goes.
enum Shown {
    /// A bar on stderr, a terminal.
    Bar(ProgressBar),
    /// Plain lines: the last line's tenth (or 100) and units done, if any.
    Lines {
        out: Box<dyn Write + Send>,
        written: Option<(u64, u64)>,
    },
}

/// The progress of `label`'s work: `done` of `total` units.
pub struct Progress {
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    shown: Shown,
}

impl Progress {
    /// On stderr: a bar if it is a terminal, plain lines otherwise.
    pub fn stderr(label: &str, unit: &'static str, total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total).with_prefix(label.to_string());
            let template = format!(
                "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, {{eta}} left)"
            );
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("#>-"));
            }
            return Progress {
                label: label.into(),
                unit,
                total,
                done: 0,
                shown: Shown::Bar(bar),
            };
        }
        Progress::lines(label, unit, total, Box::new(std::io::stderr()))
    }

    /// Plain lines to `out`, whatever it is.
    pub fn lines(
        label: &str,
        unit: &'static str,
        total: u64,
        out: Box<dyn Write + Send>,
    ) -> Progress {
        Progress {
            label: label.into(),
            unit,
            total,
            done: 0,
            shown: Shown::Lines { out, written: None },
        }
    }

    /// The units the work is expected to take.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The total is now `total` (it was not known, or it grew).
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        if let Shown::Bar(bar) = &self.shown {
            bar.set_length(total);
        }
        self.set(self.done);
    }

    /// `done` units are done.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        let (label, unit, total) = (&self.label, self.unit, self.total);
        match &mut self.shown {
            Shown::Bar(bar) => bar.set_position(done),
            Shown::Lines { out, written } => {
                let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
                let tenth = percent / 10 * 10;
                let due = match *written {
                    None => true,
                    Some((last, _)) => tenth > last || (percent == 100 && last < 100),
                };
                if due {
                    *written = Some((if percent == 100 { 100 } else { tenth }, done));
                    let _ = writeln!(out, "{label}: {done}/{total} {unit} ({percent}%)");
                }
            }
        }
    }

    /// One more unit done.
    pub fn inc(&mut self) {
        self.set(self.done + 1);
    }

    /// The work ended: the bar is cleared (the caller prints what it did);
    /// plain lines end with one that says how much was done, unless the
    /// last one did.
    pub fn finish(mut self) {
        let (done, total) = (self.done, self.total.max(self.done));
        match &mut self.shown {
            Shown::Bar(bar) => bar.finish_and_clear(),
            Shown::Lines { out, written } => {
                if *written != Some((100, done)) || total != self.total {
                    let _ = writeln!(out, "{}: {done}/{total} {} (100%)", self.label, self.unit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes the test reads afterwards.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(str::to_string).collect()
        }
    }

    #[test]
    fn plain_lines_come_at_each_tenth_and_at_the_end_only() {
        let out = Captured::default();
        let mut progress = Progress::lines("audit", "orders", 1000, Box::new(out.clone()));
        for _ in 0..1000 {
            progress.inc();
        }
        progress.finish();
        let lines = out.lines();
        assert_eq!(lines.len(), 11, "{lines:?}");
        assert_eq!(lines[0], "audit: 1/1000 orders (0%)");
        assert_eq!(lines[1], "audit: 100/1000 orders (10%)");
        assert_eq!(lines[10], "audit: 1000/1000 orders (100%)");
    }

    #[test]
    fn a_total_learned_late_or_overrun_ends_at_one_hundred_percent() {
        let out = Captured::default();
        let mut progress = Progress::lines("redrive", "dead letters", 0, Box::new(out.clone()));
        progress.set_total(3);
        progress.inc();
        progress.inc();
        progress.inc();
        progress.inc();
        progress.finish();
        let lines = out.lines();
        assert_eq!(lines.first().unwrap(), "redrive: 0/3 dead letters (0%)");
        assert_eq!(lines.last().unwrap(), "redrive: 4/4 dead letters (100%)");
        assert_eq!(
            lines.iter().filter(|l| l.ends_with("(100%)")).count(),
            2,
            "{lines:?}"
        );
    }
}
