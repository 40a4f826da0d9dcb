//! A bounded counter per id over HTTP: an account's balance, a product's
//! stock. The two services differ in names, not in flow:
//!
//! - `PUT {base}/{id}` `{"<value>": n}` creates the counter. On an existing
//!   one it is an absolute overwrite and needs `If-Match` with the ETag of a
//!   `GET` (412 if it changed since, 428 without it; `If-Match: *`
//!   overwrites whatever is there): see [`VersionedPut`].
//! - `POST {base}/{id}/{additions}` `{"<delta>": n}` adds (or, where
//!   [`Counter::removals`] allows, removes) in one statement, so it composes
//!   with the saga's own updates of the row, and never takes the value out
//!   of `0..=MAX_AMOUNT` (409 for a removal of more than there is, 422 past
//!   the top).
//! - `GET {base}/{id}`: the service's [`CounterView`], its version as `ETag`.
//!
//! Changes are operator actions: they need the admin token (401 without
//! it) and are logged.

use std::future::Future;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use contracts::limits;
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;

use crate::http::{AdminToken, ApiError, ValidJson, Version, VersionedPut};

/// Where a counter lives and how the API names its parts.
#[derive(Debug)]
pub struct Counter {
    /// Table, key column and counter column; the table also has `version`
    /// and `updated_at`.
    pub table: &'static str,
    pub key: &'static str,
    pub column: &'static str,
    /// Route of the resource (`/accounts`) and of its additions (`deposits`).
    pub base: &'static str,
    pub additions: &'static str,
    /// Names in the API: the id (`customerId`), the value a PUT sets
    /// (`balance`) and the field an addition carries (`amount`).
    pub id_name: &'static str,
    pub value_name: &'static str,
    pub delta_name: &'static str,
    /// How messages name one: `account` gives "account 'alice'".
    pub noun: &'static str,
    /// Whether an addition may be negative (stock written off) or must be
    /// positive (a deposit).
    pub removals: bool,
    /// Whether reading one needs the admin token too (a customer's
    /// account and payments) or is public (a product's stock).
    pub operator_reads: bool,
}

/// What `GET` shows of one counter (its schema is the document's).
pub trait CounterView: Serialize + utoipa::ToSchema + Sized + Send + 'static {
    fn version(&self) -> i64;
    fn load(pool: &PgPool, id: &str) -> impl Future<Output = sqlx::Result<Option<Self>>> + Send;
}

impl Counter {
    /// The routes, over `pool`; changes need `admin`'s token.
    pub fn router<V: CounterView>(&'static self, pool: PgPool, admin: AdminToken) -> OpenApiRouter {
        let router = Router::new()
            .route(&self.path(), get(read::<V>).put(put::<V>))
            .route(&self.additions_path(), post(add::<V>))
            .with_state(Shared {
                pool,
                counter: self,
                admin,
            });
        let mut routes = OpenApiRouter::from(router);
        routes.get_openapi_mut().merge(self.openapi::<V>());
        routes
    }

    /// `{base}/{<id name>}`.
    fn path(&self) -> String {
        format!("{}/{{{}}}", self.base, self.id_name)
    }

    /// `{base}/{<id name>}/{additions}`.
    fn additions_path(&self) -> String {
        format!("{}/{}", self.path(), self.additions)
    }

    /// The document of the routes: generic over the names, so made here
    /// rather than by a handler's `#[utoipa::path]`.
    pub fn openapi<V: CounterView>(&self) -> utoipa::openapi::OpenApi {
        use crate::api_doc::{OPERATOR, refusal};
        use utoipa::openapi::{
            ContentBuilder, ObjectBuilder, OpenApiBuilder, Ref, RefOr, ResponseBuilder, Type,
            path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem},
            request_body::RequestBodyBuilder,
            security::SecurityRequirement,
        };
        let Counter {
            noun,
            id_name,
            value_name,
            delta_name,
            base,
            additions,
            ..
        } = self;
        let view = V::name();
        let tag = base.trim_start_matches('/');
        let id = ParameterBuilder::new()
            .name(*id_name)
            .parameter_in(ParameterIn::Path)
            .required(utoipa::openapi::Required::True)
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .min_length(Some(1))
                    .max_length(Some(limits::MAX_ID_CHARS)),
            ))
            .build();
        let if_match = ParameterBuilder::new()
            .name("If-Match")
            .parameter_in(ParameterIn::Header)
            .description(Some(
                "The ETag of a GET (`\"<version>\"`), or `*`: needed to overwrite an existing one",
            ))
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .build();
        let shown = |description: String| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .header(
                        "ETag",
                        utoipa::openapi::HeaderBuilder::new()
                            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                            .description(Some("The version, for If-Match"))
                            .build(),
                    )
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(view.clone())))
                            .build(),
                    )
                    .build(),
            )
        };
        let body = |field: &str, minimum: i64, description: String| {
            RequestBodyBuilder::new()
                .required(Some(utoipa::openapi::Required::True))
                .description(Some(description))
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .property(
                                    field,
                                    ObjectBuilder::new()
                                        .schema_type(Type::Integer)
                                        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                                            utoipa::openapi::KnownFormat::Int64,
                                        )))
                                        .minimum(Some(minimum))
                                        .maximum(Some(limits::MAX_AMOUNT)),
                                )
                                .required(field)
                                .additional_properties(Some(
                                    utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
                                )),
                        ))
                        .build(),
                )
                .build()
        };
        let operator = || SecurityRequirement::new(OPERATOR, Vec::<String>::new());
        let mut read = OperationBuilder::new()
            .tag(tag)
            .operation_id(Some(format!("get_{tag}")))
            .summary(Some(format!("The {noun} one, with its version as ETag")))
            .parameter(id.clone())
            .response("200", shown(format!("The {noun} one")))
            .response("404", refusal(&format!("No such {noun} one")));
        if self.operator_reads {
            read = read.security(operator());
        }
        let put = OperationBuilder::new()
            .tag(tag)
            .operation_id(Some(format!("put_{tag}")))
            .summary(Some(format!(
                "Creates the {noun} one (201), or overwrites it with If-Match (200)"
            )))
            .parameter(id.clone())
            .parameter(if_match)
            .request_body(Some(body(
                value_name,
                0,
                format!("`{value_name}`: the value to set"),
            )))
            .response("200", shown("Overwritten".into()))
            .response("201", shown("Created".into()))
            .response("412", refusal("It changed since it was read (If-Match)"))
            .response("428", refusal("It exists: overwriting it needs If-Match"))
            .response("422", refusal("A value out of bounds"))
            .security(operator());
        let lowest = if self.removals {
            -limits::MAX_AMOUNT
        } else {
            1
        };
        let add = OperationBuilder::new()
            .tag(tag)
            .operation_id(Some(format!("add_{tag}_{additions}")))
            .summary(Some(format!(
                "Adds `{delta_name}` (never zero; negative where removals are allowed), composing with the saga's own changes"
            )))
            .parameter(id)
            .request_body(Some(body(
                delta_name,
                lowest,
                format!("`{delta_name}`: what to add"),
            )))
            .response("200", shown("Changed".into()))
            .response("404", refusal(&format!("No such {noun} one: create it with PUT")))
            .response("409", refusal("A removal of more than there is"))
            .response("422", refusal("Zero, or past the bounds"))
            .security(operator());
        let mut paths = utoipa::openapi::Paths::new();
        let mut item = PathItem::new(HttpMethod::Get, read);
        item.merge_operations(PathItem::new(HttpMethod::Put, put));
        paths.paths.insert(self.path(), item);
        paths
            .paths
            .insert(self.additions_path(), PathItem::new(HttpMethod::Post, add));
        let mut doc = OpenApiBuilder::new().paths(paths).build();
        let mut schemas = vec![(view.to_string(), V::schema())];
        V::schemas(&mut schemas);
        doc.components
            .get_or_insert_with(Default::default)
            .schemas
            .extend(schemas);
        doc
    }

    fn what(&self, id: &str) -> String {
        format!("{} '{id}'", self.noun)
    }

    /// Creates it if absent: its version, or `None` if it exists.
    async fn create(&self, pool: &PgPool, id: &str, value: i64) -> sqlx::Result<Option<i64>> {
        let Counter {
            table, key, column, ..
        } = self;
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} ({key}, {column}) VALUES ($1, $2)
             ON CONFLICT ({key}) DO NOTHING RETURNING version"
        )))
        .bind(id)
        .bind(value)
        .fetch_optional(pool)
        .await
    }

    /// Overwrites it if at `expected` (`None`: any version): the new version,
    /// or `None` if it was not.
    async fn overwrite(
        &self,
        pool: &PgPool,
        id: &str,
        value: i64,
        expected: Option<i64>,
    ) -> sqlx::Result<Option<i64>> {
        let Counter {
            table, key, column, ..
        } = self;
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET {column} = $2, version = version + 1, updated_at = now()
             WHERE {key} = $1 AND ($3::bigint IS NULL OR version = $3)
             RETURNING version"
        )))
        .bind(id)
        .bind(value)
        .bind(expected)
        .fetch_optional(pool)
        .await
    }

    /// Adds `delta` unless the value would leave `0..=max`; `None` if there is
    /// no such counter or the bound refused it. One statement: the row lock
    /// orders it with the saga's updates, and the bounds are checked on the
    /// value it actually changes.
    async fn add(&self, pool: &PgPool, id: &str, delta: i64, max: i64) -> sqlx::Result<bool> {
        let Counter {
            table, key, column, ..
        } = self;
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET {column} = {column} + $2, version = version + 1, updated_at = now()
             WHERE {key} = $1 AND {column} + $2 >= 0 AND {column} + $2 <= $3"
        )))
        .bind(id)
        .bind(delta)
        .bind(max)
        .execute(pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn value(&self, pool: &PgPool, id: &str) -> sqlx::Result<Option<i64>> {
        let row: Option<(i64,)> =
            crate::sql::row_by_key(pool, self.table, self.column, self.key, id).await?;
        Ok(row.map(|(value,)| value))
    }

    /// The one integer field a body must be, named `name`.
    fn field(body: Map<String, Value>, name: &str) -> Result<i64, ApiError> {
        if let Some(other) = body.keys().find(|k| *k != name) {
            return Err(ApiError::Unprocessable(format!(
                "unknown field `{other}`, expected `{name}`"
            )));
        }
        match body.get(name) {
            None => Err(ApiError::Unprocessable(format!("missing field `{name}`"))),
            Some(v) => v.as_i64().ok_or_else(|| {
                ApiError::Unprocessable(format!("`{name}` must be an integer, got {v}"))
            }),
        }
    }

    fn check_id(&self, id: &str) -> Result<(), ApiError> {
        limits::check_id(self.id_name, id).map_err(ApiError::BadRequest)
    }
}

#[derive(Clone)]
struct Shared {
    pool: PgPool,
    counter: &'static Counter,
    admin: AdminToken,
}

/// Whether a change of `id` may go ahead: the operator's token, then the id.
fn change(shared: &Shared, headers: &HeaderMap, method: &str, id: &str) -> Result<(), ApiError> {
    let counter = shared.counter;
    shared
        .admin
        .check(headers, &format!("{method} {}/{id}", counter.base))?;
    counter.check_id(id)
}

async fn put<V: CounterView>(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    change(&shared, &headers, "PUT", &id)?;
    let Shared { pool, counter, .. } = shared;
    let value = Counter::field(body, counter.value_name)?;
    limits::check_range(counter.value_name, value, 0, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    let put = VersionedPut {
        what: &counter.what(&id),
        hint: &format!(
            "to change it by an amount, POST {}/{id}/{}",
            counter.base, counter.additions
        ),
    };
    let (status, _) = put
        .run(
            &headers,
            || counter.create(&pool, &id, value),
            |expected| counter.overwrite(&pool, &id, value, expected),
            || async { Ok(V::load(&pool, &id).await?.map(|v| v.version())) },
        )
        .await?;
    tracing::warn!(what = %counter.what(&id), value, "operator set {}", counter.value_name);
    respond::<V>(&pool, counter, &id, status).await
}

async fn add<V: CounterView>(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ValidJson(body): ValidJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    change(&shared, &headers, "POST", &id)?;
    let Shared { pool, counter, .. } = shared;
    let name = counter.delta_name;
    let delta = Counter::field(body, name)?;
    let lowest = match counter.removals {
        true => -limits::MAX_AMOUNT,
        false => 1,
    };
    if delta == 0 {
        return Err(ApiError::Unprocessable(format!("{name} must not be zero")));
    }
    limits::check_range(name, delta, lowest, limits::MAX_AMOUNT)
        .map_err(ApiError::Unprocessable)?;
    if counter.add(&pool, &id, delta, limits::MAX_AMOUNT).await? {
        tracing::warn!(what = %counter.what(&id), delta, "operator changed {}", counter.value_name);
        return respond::<V>(&pool, counter, &id, StatusCode::OK).await;
    }
    let what = counter.what(&id);
    let value_name = counter.value_name;
    Err(match counter.value(&pool, &id).await? {
        None => ApiError::NotFound(format!(
            "no {what}; create it with PUT {}/{id}",
            counter.base
        )),
        Some(value) if delta < 0 => ApiError::Conflict(format!(
            "cannot remove {} from {what}: only {value} {value_name}",
            -delta
        )),
        Some(value) => ApiError::Unprocessable(format!(
            "adding {delta} to {what} would take {value_name} ({value}) over {}",
            limits::MAX_AMOUNT
        )),
    })
}

async fn read<V: CounterView>(
    State(Shared {
        pool,
        counter,
        admin,
    }): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if counter.operator_reads {
        admin.check(&headers, &format!("GET {}/{{id}}", counter.base))?;
    }
    counter.check_id(&id)?;
    respond::<V>(&pool, counter, &id, StatusCode::OK).await
}

/// The view as JSON, with its version as the `ETag`.
async fn respond<V: CounterView>(
    pool: &PgPool,
    counter: &Counter,
    id: &str,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let view = V::load(pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no {}", counter.what(id))))?;
    Ok((
        status,
        [(header::ETAG, Version::Exactly(view.version()).etag())],
        Json(view),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_body_is_exactly_its_one_integer_field() {
        let field = |v| Counter::field(body(v), "amount").map_err(|e| e.to_string());
        assert_eq!(field(json!({"amount": 5})), Ok(5));
        assert_eq!(field(json!({"amount": -5})), Ok(-5));
        for (bad, says) in [
            (json!({}), "missing field `amount`"),
            (json!({"amount": 1, "extra": 2}), "unknown field `extra`"),
            (json!({"amount": "many"}), "must be an integer"),
            (json!({"amount": 1.5}), "must be an integer"),
            (
                json!({"amount": 18446744073709551615u64}),
                "must be an integer",
            ),
        ] {
            let error = field(bad.clone()).expect_err("refused");
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
