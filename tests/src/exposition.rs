//! `/metrics` as a test reads it: checked by `promtool check metrics`, then
//! parsed into series so a test asserts on values.

use anyhow::{Context, Result};

/// One sample: `name{labels} value`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone)]
pub struct Exposition(pub Vec<Sample>);

impl Exposition {
    /// Parses the text format (comments skipped; label values without
    /// escaped quotes, which is all ours have).
    pub fn parse(text: &str) -> Result<Exposition> {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').context("no value")?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("value of {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').context("unclosed labels")?;
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once("=\"").context("label")?;
                            Ok((k.to_string(), v.trim_end_matches('"').to_string()))
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (name, labels)
                }
            };
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Ok(Exposition(samples))
    }

    /// The sum over the series named `name` that carry every label of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.matching(name, with).map(|s| s.value).sum()
    }

    /// Whether any series named `name` carries every label of `with`.
    pub fn has(&self, name: &str, with: &[(&str, &str)]) -> bool {
        self.matching(name, with).next().is_some()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_with_their_labels() {
        let text = "# HELP x y\n# TYPE saga_events_total counter\n\
                    saga_events_total{service=\"payment\",disposition=\"applied\"} 3\n\
                    saga_events_total{service=\"order\",disposition=\"applied\"} 2\n\
                    saga_outbox_depth 0\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.sum("saga_events_total", &[]), 5.0);
        assert_eq!(e.sum("saga_events_total", &[("service", "payment")]), 3.0);
        assert!(e.has("saga_outbox_depth", &[]));
        assert!(!e.has("saga_events_total", &[("service", "shipping")]));
        assert!(Exposition::parse("saga_x{a=\"1\" 2").is_err());
    }
}
