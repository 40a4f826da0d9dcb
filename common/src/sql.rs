//! What the services' stores share: reading one row by its key.

use sqlx::{FromRow, PgExecutor, Postgres, postgres::PgRow};

/// The row of `table` whose `key` column is `value`, read as `T` from
/// `columns`; `None` if there is none. Table, columns and key are the
/// caller's constants (`'static`), never input.
pub async fn row_by_key<'e, T, V>(
    conn: impl PgExecutor<'e>,
    table: &'static str,
    columns: &'static str,
    key: &'static str,
    value: V,
) -> sqlx::Result<Option<T>>
where
    T: for<'r> FromRow<'r, PgRow> + Send + Unpin,
    V: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
{
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {columns} FROM {table} WHERE {key} = $1"
    )))
    .bind(value)
    .fetch_optional(conn)
    .await
}

/// One field of every item, as a column to bind as an array (`UNNEST($1::…[])`).
pub fn column<T, R>(items: &[T], field: impl Fn(&T) -> R) -> Vec<R> {
    items.iter().map(field).collect()
}
