//! What the background parts of a service (consumer, relay, dead-lettering,
//! command responder, Redis) last said about themselves, for readiness.
//!
//! Each part reports a [`Condition`] under its own name whenever it changes;
//! `/health/ready` shows them all next to its live checks of Postgres, Redis
//! and NATS. A part that is failing makes the service unready (503) with the
//! reason; a degraded one keeps it ready but says so; an alert is a problem
//! that needs a person and does not stop the service (an event that could
//! not be published was parked).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use serde::Serialize;

/// The state of one part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "camelCase")]
pub enum Condition {
    Ok,
    /// Working, with less than it should have (Redis down: the Postgres guard alone).
    Degraded(String),
    /// Not doing its job: the service is not ready.
    Failing(String),
    /// Working, but something needs a person.
    Alert(String),
}

/// A part's condition and when it last changed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(flatten)]
    pub condition: Condition,
    pub since: DateTime<Utc>,
}

/// Shared board of reports; cheap to clone.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, Report>>>);

impl Health {
    /// Records `condition` for `part`; the time only moves when it changes.
    /// Returns whether it changed (so callers log transitions once).
    pub fn report(&self, part: &str, condition: Condition) -> bool {
        let mut board = self.0.lock().expect("health board lock");
        match board.get(part) {
            Some(r) if r.condition == condition => false,
            _ => {
                board.insert(
                    part.to_string(),
                    Report {
                        condition,
                        since: Utc::now(),
                    },
                );
                true
            }
        }
    }

    /// Marks `part` working.
    pub fn ok(&self, part: &str) -> bool {
        self.report(part, Condition::Ok)
    }

    /// Every report, by part.
    pub fn snapshot(&self) -> BTreeMap<String, Report> {
        self.0.lock().expect("health board lock").clone()
    }

    /// The condition of `part`, if it ever reported.
    pub fn condition(&self, part: &str) -> Option<Condition> {
        self.0
            .lock()
            .expect("health board lock")
            .get(part)
            .map(|r| r.condition.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_report_is_not_a_change() {
        let h = Health::default();
        assert!(h.report("relay", Condition::Failing("x".into())));
        assert!(!h.report("relay", Condition::Failing("x".into())));
        assert!(h.ok("relay"));
        assert_eq!(h.condition("relay"), Some(Condition::Ok));
    }
}
