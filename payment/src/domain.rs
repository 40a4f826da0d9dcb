//! Payment decisions: pure functions, no I/O.

use common::{compensation::StepState, event::Money, limits};

/// What to do with a charge request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeDecision {
    /// Take `amount`; the account is left with `new_balance`.
    Charge { new_balance: Money },
    /// Decline with a reason the order will carry.
    Decline { reason: String },
}

/// Charges `amount` to an account holding `balance` (`None`: no such account).
pub fn decide_charge(customer_id: &str, balance: Option<Money>, amount: Money) -> ChargeDecision {
    match balance {
        None => ChargeDecision::Decline {
            reason: limits::reason(format!("payment declined: unknown account '{customer_id}'")),
        },
        Some(balance) => match balance.checked_sub(amount) {
            Some(new_balance) if amount > 0 && new_balance >= 0 => {
                ChargeDecision::Charge { new_balance }
            }
            _ if amount <= 0 => ChargeDecision::Decline {
                reason: format!("payment declined: amount must be positive, got {amount}"),
            },
            _ => ChargeDecision::Decline {
                reason: format!(
                    "payment declined: insufficient funds (balance {balance}, amount {amount})"
                ),
            },
        },
    }
}

/// State of the payment of one order, stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum PaymentStatus {
    Charged,
    Failed,
    Refunded,
}

impl PaymentStatus {
    /// Where the charge stands for a refund: only a taken charge is given back.
    pub fn step_state(self) -> StepState {
        match self {
            PaymentStatus::Charged => StepState::Done,
            PaymentStatus::Failed => StepState::Refused,
            PaymentStatus::Refunded => StepState::Compensated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_within_the_balance_is_taken() {
        // given an account with 1000, when 400 is charged
        let decision = decide_charge("c1", Some(1000), 400);
        // then 600 is left
        assert_eq!(decision, ChargeDecision::Charge { new_balance: 600 });
    }

    #[test]
    fn a_charge_of_exactly_the_balance_empties_the_account() {
        assert_eq!(
            decide_charge("c1", Some(400), 400),
            ChargeDecision::Charge { new_balance: 0 }
        );
    }

    #[test]
    fn a_charge_above_the_balance_is_declined_for_insufficient_funds() {
        let ChargeDecision::Decline { reason } = decide_charge("c1", Some(399), 400) else {
            panic!("expected a decline");
        };
        assert!(reason.contains("insufficient funds"), "{reason}");
    }

    #[test]
    fn a_charge_to_an_unknown_account_is_declined_naming_it() {
        let ChargeDecision::Decline { reason } = decide_charge("ghost", None, 1) else {
            panic!("expected a decline");
        };
        assert!(reason.contains("unknown account 'ghost'"), "{reason}");
    }

    #[test]
    fn a_charge_that_is_not_positive_never_adds_money() {
        assert!(matches!(
            decide_charge("c1", Some(100), -5),
            ChargeDecision::Decline { .. }
        ));
        assert!(matches!(
            decide_charge("c1", Some(100), 0),
            ChargeDecision::Decline { .. }
        ));
    }

    #[test]
    fn only_a_charged_payment_is_refunded_and_only_once() {
        use PaymentStatus::*;
        use common::compensation::{Compensation::*, decide};
        let decided = [Charged, Refunded, Failed].map(|status| decide(status.step_state()));
        assert_eq!(decided, [Undo, AlreadyUndone, NothingToUndo]);
    }
}
