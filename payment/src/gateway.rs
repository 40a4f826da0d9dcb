//! The payment gateway, behind an adapter: charges and refunds, each keyed
//! by the payment id, so a retried or repeated call (a redelivery, a crash
//! after the call and before the commit) never moves money twice.
//!
//! The gateway shipped is a simulation in the process. It can be told, for
//! everyone or per customer, to fail or to time out charges or refunds, and
//! to answer slowly (`GATEWAY_RULES`, JSON), so tests and demos can break it
//! on purpose.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Mutex, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the gateway does with one kind of call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Carries it out.
    #[default]
    Ok,
    /// Refuses it (a charge is declined; a refund is refused and retried).
    Fail,
    /// Never answers in time, and does nothing.
    Timeout,
    /// Carries it out, but its answer is lost: the caller sees a timeout
    /// although the money moved (asked again with the same payment id, it
    /// says the call went through after all).
    Lost,
}

/// How the gateway behaves for someone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Behaviour {
    #[serde(default)]
    pub charges: Mode,
    #[serde(default)]
    pub refunds: Mode,
    /// Added to every call, in milliseconds (at most a minute).
    #[serde(default)]
    #[schema(maximum = 60_000)]
    pub latency_ms: u64,
}

/// The simulation's rules: a behaviour for everyone, and exceptions per
/// customer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rules {
    #[serde(default)]
    pub all: Behaviour,
    #[serde(default)]
    pub customers: BTreeMap<String, Behaviour>,
}

/// Most customers the rules may name.
pub const MAX_CUSTOMER_RULES: usize = 1_000;
const MAX_LATENCY_MS: u64 = 60_000;

impl Rules {
    pub fn check(&self) -> Result<(), String> {
        if self.customers.len() > MAX_CUSTOMER_RULES {
            return Err(format!(
                "at most {MAX_CUSTOMER_RULES} customers, got {}",
                self.customers.len()
            ));
        }
        for customer in self.customers.keys() {
            common::limits::check_id("customer", customer)?;
        }
        for b in std::iter::once(&self.all).chain(self.customers.values()) {
            if b.latency_ms > MAX_LATENCY_MS {
                return Err(format!(
                    "latencyMs must be at most {MAX_LATENCY_MS}, got {}",
                    b.latency_ms
                ));
            }
        }
        Ok(())
    }

    fn for_customer(&self, customer: &str) -> Behaviour {
        self.customers.get(customer).copied().unwrap_or(self.all)
    }
}

/// Why a gateway call did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// It said no (a declined charge, a refused refund).
    #[error("the gateway refused: {0}")]
    Refused(String),
    /// It did not answer in time: the outcome is unknown, and the same call
    /// (same payment id) may be made again.
    #[error("the gateway did not answer within {0:?}")]
    TimedOut(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Call {
    Charge,
    Refund,
}

/// What a void did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voided {
    /// A charge under the payment id had gone through: it was given back
    /// (now, or by an earlier void or refund of the same payment id).
    Charge(i64),
    /// No charge under the payment id went through: nothing to give back,
    /// and none will ever go through now.
    Nothing,
}

/// What the gateway holds for one payment id, as its console shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRecord {
    /// The amount charged, if a charge went through.
    pub charged: Option<i64>,
    /// The amount given back (a refund or a void), if any.
    pub refunded: Option<i64>,
    /// Voided: no charge under this payment id goes through any more.
    pub voided: bool,
}

/// Calls the simulated gateway remembers (about 13 MB at most): a
/// repeated call is answered from them as long as fewer than this many
/// other calls came in between, far longer than the service retries a
/// call (a refund's schedule, a redelivery after a crash). A gateway of
/// record keeps its idempotency keys on its side.
pub const KEPT_CALLS: usize = 200_000;

/// Calls carried out, by payment id, the latest [`KEPT_CALLS`] of them.
/// A void is kept as a refund of what was charged (0 if nothing was).
#[derive(Debug, Default)]
struct Done {
    amounts: HashMap<(Uuid, Call), i64>,
    /// Oldest first: the next to forget.
    order: VecDeque<(Uuid, Call)>,
}

impl Done {
    fn contains(&self, key: &(Uuid, Call)) -> bool {
        self.amounts.contains_key(key)
    }

    fn get(&self, payment_id: Uuid, call: Call) -> Option<i64> {
        self.amounts.get(&(payment_id, call)).copied()
    }

    fn insert(&mut self, key: (Uuid, Call), amount: i64) {
        if self.amounts.insert(key, amount).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > KEPT_CALLS {
            if let Some(oldest) = self.order.pop_front() {
                self.amounts.remove(&oldest);
            }
        }
    }
}

/// The simulated gateway.
#[derive(Debug)]
pub struct Gateway {
    rules: RwLock<Rules>,
    /// Calls carried out: a repeated call is answered from here.
    done: Mutex<Done>,
    /// How long a call may take before it counts as timed out.
    timeout: Duration,
}

impl Gateway {
    pub fn new(rules: Rules, timeout: Duration) -> Gateway {
        Gateway {
            rules: RwLock::new(rules),
            done: Mutex::new(Done::default()),
            timeout,
        }
    }

    pub fn rules(&self) -> Rules {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_rules(&self, rules: Rules) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    /// Takes `amount` from `customer` for `payment_id`.
    pub async fn charge(
        &self,
        payment_id: Uuid,
        customer: &str,
        amount: i64,
    ) -> Result<(), GatewayError> {
        self.call(Call::Charge, payment_id, customer, amount).await
    }

    /// Gives `amount` back to `customer` for `payment_id`.
    pub async fn refund(
        &self,
        payment_id: Uuid,
        customer: &str,
        amount: i64,
    ) -> Result<(), GatewayError> {
        self.call(Call::Refund, payment_id, customer, amount).await
    }

    /// Calls off `payment_id` for `customer`, whatever became of its charge:
    /// one that went through (its answer lost, say) is given back, and none
    /// goes through from now on. Idempotent, like every call; it follows
    /// the refund rules (refused, unanswered or lost like a refund).
    pub async fn void(&self, payment_id: Uuid, customer: &str) -> Result<Voided, GatewayError> {
        let behaviour = self.rules().for_customer(customer);
        let answer = async {
            if behaviour.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(behaviour.latency_ms)).await;
            }
            let outcome = {
                let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                let charged = done.get(payment_id, Call::Charge);
                let voided = || match charged {
                    Some(amount) => Voided::Charge(amount),
                    None => Voided::Nothing,
                };
                match behaviour.refunds {
                    _ if done.contains(&(payment_id, Call::Refund)) => Some(Ok(voided())),
                    Mode::Ok | Mode::Lost => {
                        done.insert((payment_id, Call::Refund), charged.unwrap_or(0));
                        match behaviour.refunds {
                            Mode::Lost => None,
                            _ => Some(Ok(voided())),
                        }
                    }
                    Mode::Fail => Some(Err(GatewayError::Refused(
                        "void refused (simulated)".into(),
                    ))),
                    Mode::Timeout => None,
                }
            };
            match outcome {
                Some(answer) => answer,
                None => std::future::pending().await,
            }
        };
        tokio::time::timeout(self.timeout, answer)
            .await
            .unwrap_or(Err(GatewayError::TimedOut(self.timeout)))
    }

    /// What the gateway holds for `payment_id` (while it remembers it).
    pub fn payment(&self, payment_id: Uuid) -> PaymentRecord {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let refunded = done.get(payment_id, Call::Refund);
        PaymentRecord {
            charged: done.get(payment_id, Call::Charge),
            refunded,
            voided: refunded.is_some(),
        }
    }

    async fn call(
        &self,
        call: Call,
        payment_id: Uuid,
        customer: &str,
        amount: i64,
    ) -> Result<(), GatewayError> {
        let behaviour = self.rules().for_customer(customer);
        let answer = async {
            // Not even a zero sleep when no latency is asked for: it would
            // wait for the timer's next tick, up to a millisecond.
            if behaviour.latency_ms > 0 {
                tokio::time::sleep(Duration::from_millis(behaviour.latency_ms)).await;
            }
            let mode = match call {
                Call::Charge => behaviour.charges,
                Call::Refund => behaviour.refunds,
            };
            let outcome = {
                let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
                // The idempotency key: what was done for this payment stays done.
                match mode {
                    _ if done.contains(&(payment_id, call)) => Some(Ok(())),
                    // Given back already (a void, or a refund): the payment
                    // is over, and no charge under its id goes through.
                    _ if call == Call::Charge && done.contains(&(payment_id, Call::Refund)) => {
                        Some(Err(GatewayError::Refused(format!(
                            "payment {payment_id} was voided"
                        ))))
                    }
                    Mode::Ok => {
                        done.insert((payment_id, call), amount);
                        Some(Ok(()))
                    }
                    Mode::Lost => {
                        done.insert((payment_id, call), amount);
                        None
                    }
                    Mode::Fail => Some(Err(GatewayError::Refused(match call {
                        Call::Charge => "charge declined (simulated)".into(),
                        Call::Refund => "refund refused (simulated)".into(),
                    }))),
                    Mode::Timeout => None,
                }
            };
            match outcome {
                Some(answer) => answer,
                None => std::future::pending().await,
            }
        };
        tokio::time::timeout(self.timeout, answer)
            .await
            .unwrap_or(Err(GatewayError::TimedOut(self.timeout)))
    }

    /// Refunds carried out and still remembered, by payment id.
    pub fn refunds(&self) -> BTreeMap<Uuid, i64> {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        done.amounts
            .iter()
            .filter(|((_, call), _)| *call == Call::Refund)
            .map(|((id, _), amount)| (*id, *amount))
            .collect()
    }
}

/// The payment id of an order's payment: derived from the order, so every
/// attempt to charge it, before or after a crash, names the same payment.
pub fn payment_id(order_id: Uuid) -> Uuid {
    Uuid::new_v5(&PAYMENTS, order_id.as_bytes())
}

/// Namespace of payment ids.
const PAYMENTS: Uuid = Uuid::from_u128(0x6d1f_3c2a_8b4e_4f0a_9c3d_5e7b_1a2c_4d6e);

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(rules: Rules) -> Gateway {
        Gateway::new(rules, Duration::from_millis(200))
    }

    #[tokio::test]
    async fn a_repeated_call_is_answered_from_what_was_done() {
        let g = gateway(Rules::default());
        let id = Uuid::now_v7();
        g.refund(id, "alice", 500).await.unwrap();
        // The gateway breaks; the same refund asked again is already done.
        g.set_rules(Rules {
            all: Behaviour {
                refunds: Mode::Fail,
                ..Behaviour::default()
            },
            ..Rules::default()
        });
        g.refund(id, "alice", 500).await.unwrap();
        assert_eq!(g.refunds(), BTreeMap::from([(id, 500)]));
        assert!(matches!(
            g.refund(Uuid::now_v7(), "alice", 500).await,
            Err(GatewayError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn rules_apply_per_customer_and_a_timeout_is_reported_as_one() {
        let g = gateway(Rules {
            customers: BTreeMap::from([(
                "bob".to_string(),
                Behaviour {
                    charges: Mode::Timeout,
                    ..Behaviour::default()
                },
            )]),
            ..Rules::default()
        });
        assert_eq!(g.charge(Uuid::now_v7(), "alice", 1).await, Ok(()));
        assert_eq!(
            g.charge(Uuid::now_v7(), "bob", 1).await,
            Err(GatewayError::TimedOut(Duration::from_millis(200)))
        );
    }

    fn charges_for(customer: &str, charges: Mode) -> Rules {
        Rules {
            customers: BTreeMap::from([(
                customer.to_string(),
                Behaviour {
                    charges,
                    ..Behaviour::default()
                },
            )]),
            ..Rules::default()
        }
    }

    #[tokio::test]
    async fn a_lost_charge_went_through_and_a_void_gives_it_back_once() {
        let g = gateway(charges_for("bob", Mode::Lost));
        let id = Uuid::now_v7();
        assert!(matches!(
            g.charge(id, "bob", 700).await,
            Err(GatewayError::TimedOut(_))
        ));
        assert_eq!(
            g.payment(id).charged,
            Some(700),
            "it went through after all"
        );
        assert_eq!(g.void(id, "bob").await, Ok(Voided::Charge(700)));
        assert_eq!(
            g.void(id, "bob").await,
            Ok(Voided::Charge(700)),
            "idempotent"
        );
        assert_eq!(
            g.payment(id),
            PaymentRecord {
                charged: Some(700),
                refunded: Some(700),
                voided: true
            }
        );
    }

    #[tokio::test]
    async fn a_voided_payment_id_is_never_charged_afterwards() {
        let g = gateway(Rules::default());
        let id = Uuid::now_v7();
        assert_eq!(g.void(id, "alice").await, Ok(Voided::Nothing));
        assert!(matches!(
            g.charge(id, "alice", 100).await,
            Err(GatewayError::Refused(_))
        ));
        assert_eq!(g.payment(id).charged, None);
    }

    #[test]
    fn it_remembers_the_latest_calls_and_forgets_the_oldest_first() {
        let mut done = Done::default();
        let first = (Uuid::now_v7(), Call::Refund);
        done.insert(first, 1);
        done.insert(first, 1);
        for _ in 0..KEPT_CALLS - 1 {
            done.insert((Uuid::now_v7(), Call::Charge), 1);
        }
        assert!(done.contains(&first), "within the latest {KEPT_CALLS}");
        let last = (Uuid::now_v7(), Call::Charge);
        done.insert(last, 1);
        assert!(!done.contains(&first), "the oldest goes first");
        assert!(done.contains(&last));
        assert_eq!(done.amounts.len(), KEPT_CALLS);
        assert_eq!(done.order.len(), KEPT_CALLS);
    }

    #[test]
    fn payment_ids_follow_the_order() {
        let order = Uuid::now_v7();
        assert_eq!(payment_id(order), payment_id(order));
        assert_ne!(payment_id(order), payment_id(Uuid::now_v7()));
    }

    #[test]
    fn rules_are_bounded() {
        let slow = Rules {
            all: Behaviour {
                latency_ms: MAX_LATENCY_MS + 1,
                ..Behaviour::default()
            },
            ..Rules::default()
        };
        assert!(slow.check().unwrap_err().contains("latencyMs"));
        let parsed: Rules = serde_json::from_str(
            r#"{"all":{"refunds":"fail"},"customers":{"bob":{"charges":"timeout","latencyMs":5}}}"#,
        )
        .unwrap();
        assert_eq!(parsed.all.refunds, Mode::Fail);
        assert!(parsed.check().is_ok());
        assert!(serde_json::from_str::<Rules>(r#"{"all":{"refund":"fail"}}"#).is_err());
    }
}
