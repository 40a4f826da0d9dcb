//! What an operator did to a saga, as the audit trail records it: published
//! by the operator tool on `<prefix>.operator.<action>` (in the events
//! stream, where the order service's observer puts it into the saga's
//! timeline; no service acts on it).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::limits;

/// One operator action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorAction {
    /// Unique per action: redelivery and replay record it once.
    pub action_id: Uuid,
    /// `dlq-redrive`, …; also the last subject token.
    pub action: String,
    /// Who (`--operator`, default the login name).
    pub operator: String,
    /// Why, in the operator's words.
    pub note: String,
    pub at: DateTime<Utc>,
    /// The saga it concerns, when known.
    pub correlation_id: Option<Uuid>,
    /// What was done, in a few words (`redrove OrderPlaced (dead letter 7 of payment)`).
    pub effect: String,
}

impl OperatorAction {
    /// Within bounds, and an action that can be a subject token.
    pub fn check(&self) -> Result<(), String> {
        limits::check_id("action", &self.action)?;
        if !self
            .action
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '-')
        {
            return Err(format!(
                "action must be lowercase letters and '-', got {:?}",
                self.action
            ));
        }
        limits::check_id("operator", &self.operator)?;
        limits::check_reason("note", &self.note)?;
        limits::check_reason("effect", &self.effect)
    }
}
