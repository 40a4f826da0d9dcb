//! Which of a service's replicas publishes its outbox: the one holding the
//! database's relay lease (`relay_lease`, one row).
//!
//! The leader renews the lease every fifth of its length; a standby asks for
//! it at each of its own rounds and gets it once it has expired (the leader
//! is frozen, hung or cut off from the database) or once the holder's
//! database session is gone (the leader died: its connection closed). Time
//! is the database's clock, so replicas' clocks need not agree.
//!
//! A leader that was frozen longer than half its lease stops before it
//! publishes again and asks anew ([`Lead::fresh`]): by then a standby may
//! lead. What a thawed leader had already sent is a copy of what the new one
//! publishes, with the same event ids: the broker drops it within its
//! duplicate window, and the consumers' guards after it.

use std::time::{Duration, Instant};

use sqlx::PgConnection;

/// What asking for the lease found.
#[derive(Debug, Clone, PartialEq)]
pub enum Asked {
    /// This relay holds it now, in this epoch.
    Held { epoch: i64 },
    /// Another holds it, and renewed it this long ago (nobody, if `None`).
    Standby {
        leader: Option<String>,
        silent: Duration,
    },
}

/// Takes or renews the lease for `holder` for `length`, in one statement:
/// it succeeds when `holder` already holds it, when it has expired, or when
/// its holder's session is gone.
pub async fn ask(
    conn: &mut PgConnection,
    holder: &str,
    length: Duration,
) -> Result<Asked, sqlx::Error> {
    let (epoch, leader, silent): (Option<i64>, Option<String>, Option<f64>) = sqlx::query_as(
        "WITH took AS (
             INSERT INTO relay_lease AS l (holder, backend_pid, epoch, renewed_at, expires_at)
             VALUES ($1, pg_backend_pid(), 1, clock_timestamp(),
                     clock_timestamp() + make_interval(secs => $2))
             ON CONFLICT (id) DO UPDATE SET
                 holder = EXCLUDED.holder,
                 backend_pid = EXCLUDED.backend_pid,
                 epoch = l.epoch + (l.holder <> EXCLUDED.holder)::int,
                 renewed_at = EXCLUDED.renewed_at,
                 expires_at = EXCLUDED.expires_at
             WHERE l.holder = EXCLUDED.holder
                OR l.expires_at < clock_timestamp()
                OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.backend_pid)
             RETURNING l.epoch
         )
         SELECT (SELECT epoch FROM took), l.holder,
                extract(epoch FROM clock_timestamp() - l.renewed_at)::float8
         FROM (VALUES (1)) AS one LEFT JOIN relay_lease l ON true",
    )
    .bind(holder)
    .bind(length.as_secs_f64())
    .fetch_one(conn)
    .await?;
    Ok(match epoch {
        Some(epoch) => Asked::Held { epoch },
        None => Asked::Standby {
            leader,
            silent: Duration::try_from_secs_f64(silent.unwrap_or(0.0)).unwrap_or_default(),
        },
    })
}

/// Gives the lease up (at shutdown), so a standby leads at its next round
/// instead of when the lease would have expired.
pub async fn release(conn: &mut PgConnection, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM relay_lease WHERE holder = $1")
        .bind(holder)
        .execute(conn)
        .await?;
    Ok(())
}

/// The lease as this relay holds it, by its own monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Lead {
    pub epoch: i64,
    /// When it was last asked for (before the statement was sent: the
    /// database's expiry is later than this plus the length).
    pub asked: Instant,
    pub length: Duration,
}

impl Lead {
    /// How often the leader renews: a fifth of the lease.
    pub fn renew_every(length: Duration) -> Duration {
        length / 5
    }

    /// Whether it is time to renew.
    pub fn due(&self) -> bool {
        self.asked.elapsed() >= Self::renew_every(self.length)
    }

    /// Whether it may still publish: less than half the lease has passed
    /// since it was renewed. A leader frozen longer asks again first.
    pub fn fresh(&self) -> bool {
        self.asked.elapsed() < self.length / 2
    }
}

/// How long a standby lets the leader be silent before it says so in its
/// readiness: two missed renewals.
pub fn silent_too_long(silent: Duration, length: Duration) -> bool {
    silent > Lead::renew_every(length) * 2 + Duration::from_millis(500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lead_is_renewed_every_fifth_and_publishes_for_half_its_length() {
        let length = Duration::from_secs(10);
        let lead = Lead {
            epoch: 1,
            asked: Instant::now(),
            length,
        };
        assert!(!lead.due() && lead.fresh());
        let old = Lead {
            asked: Instant::now() - Duration::from_secs(6),
            ..lead
        };
        assert!(old.due() && !old.fresh());
        assert_eq!(Lead::renew_every(length), Duration::from_secs(2));
    }

    #[test]
    fn a_leader_is_silent_too_long_after_two_missed_renewals() {
        let length = Duration::from_secs(10);
        assert!(!silent_too_long(Duration::from_secs(3), length));
        assert!(silent_too_long(Duration::from_secs(5), length));
    }
}
