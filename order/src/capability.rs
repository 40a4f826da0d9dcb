//! The customer's right to cancel an order: a cancel token, handed out once
//! in the placement's answer and kept only as its SHA-256. The customer's
//! cancel (`POST /orders/{id}/cancel` with `Authorization: Bearer <token>`,
//! or `cancelToken` in the NATS command) must present it; the operator's
//! token cancels any order.
//!
//! A token is 256 bits from the operating system's random source, so it
//! cannot be guessed; a stolen database gives only hashes.

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

/// Most cancel tokens one order can have: one per answer to its placement
/// (the first, and each repeat of its Idempotency-Key).
pub const MAX_TOKENS_PER_ORDER: i64 = 16;

/// Longest token accepted for checking (a real one is 67 characters).
const MAX_TOKEN_CHARS: usize = 128;

/// A cancel token, as the placement answer shows it: `ct_` and 64 hex digits.
#[derive(Clone, PartialEq, Eq)]
pub struct CancelToken(String);

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CancelToken(…)")
    }
}

impl CancelToken {
    /// A fresh token.
    pub fn new() -> CancelToken {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        bytes[16..].copy_from_slice(Uuid::new_v4().as_bytes());
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        CancelToken(format!("ct_{hex}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What is stored of it.
    fn hash(&self) -> Vec<u8> {
        hash(&self.0)
    }
}

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken::new()
    }
}

fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The hashes of cancel tokens (each with its order), kept by the
/// statement that places the orders ([`Kept::cte`]).
pub struct Kept {
    hashes: Vec<Vec<u8>>,
    orders: Vec<Uuid>,
}

impl Kept {
    pub fn of(tokens: &[(Uuid, &CancelToken)]) -> Kept {
        Kept {
            hashes: tokens.iter().map(|(_, t)| t.hash()).collect(),
            orders: tokens.iter().map(|(id, _)| *id).collect(),
        }
    }

    /// A common table expression, `kept`, that inserts the hashes, with
    /// their arrays as the statement's parameters `$first` and `$first + 1`
    /// (bound by [`Kept::bind_to`]).
    pub fn cte(first: usize) -> String {
        let second = first + 1;
        format!(
            "kept AS (
                 INSERT INTO cancel_capabilities (token_hash, order_id)
                 SELECT * FROM UNNEST(${first}::bytea[], ${second}::uuid[])
             )"
        )
    }

    /// Binds the arrays as the next two parameters of `query`.
    pub fn bind_to<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query.bind(&self.hashes).bind(&self.orders)
    }
}

/// Another token for `order_id` (a placement answered again), unless it
/// has [`MAX_TOKENS_PER_ORDER`] already.
pub async fn another(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<CancelToken>> {
    let token = CancelToken::new();
    let kept = sqlx::query(
        "INSERT INTO cancel_capabilities (token_hash, order_id)
         SELECT $1, $2
         WHERE (SELECT count(*) FROM cancel_capabilities WHERE order_id = $2) < $3",
    )
    .bind(token.hash())
    .bind(order_id)
    .bind(MAX_TOKENS_PER_ORDER)
    .execute(conn)
    .await?;
    Ok((kept.rows_affected() == 1).then_some(token))
}

/// Whether `token` cancels `order_id`.
pub async fn grants(conn: &mut PgConnection, order_id: Uuid, token: &str) -> sqlx::Result<bool> {
    if token.len() > MAX_TOKEN_CHARS {
        return Ok(false);
    }
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM cancel_capabilities WHERE token_hash = $1 AND order_id = $2)",
    )
    .bind(hash(token))
    .bind(order_id)
    .fetch_one(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_only_their_hash_is_kept() {
        let (a, b) = (CancelToken::new(), CancelToken::new());
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 67);
        assert!(a.as_str().starts_with("ct_"));
        assert_eq!(a.hash().len(), 32);
        assert_ne!(a.hash(), a.as_str().as_bytes());
        assert_eq!(format!("{a:?}"), "CancelToken(…)");
    }
}
