//! The product catalog's events: inventory owns products (name, price,
//! stock) and publishes every change of a product's catalog data as a
//! `ProductPriced` event; the order service keeps a local catalog from them
//! and prices every order line itself.
//!
//! Catalog events are not saga events: they belong to no order, so they are
//! not in the saga's [`EventKind`](crate::EventKind) catalog and travel on
//! a stream of their own (`SAGA_CATALOG`, subjects `saga.catalog.>`) that
//! keeps the latest event of each product for good: the stream alone
//! rebuilds a catalog. They use the same [`Envelope`]: `aggregateType`
//! `product`, `aggregateId` the product id, `version` the product's version
//! at inventory (each change bumps it), and `correlationId` =
//! `causationId` = the id of the request that changed it.

use chrono::{SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    event::{DecodeError, Envelope, Metadata, Money},
    limits,
};

/// The stable type name on the wire.
pub const PRODUCT_PRICED: &str = "ProductPriced";
/// Its current schema version.
pub const SCHEMA_VERSION: u32 = 1;
/// The envelope's `aggregateType`.
pub const AGGREGATE_TYPE: &str = "product";

/// A product's catalog data as of one version: what an order line of it costs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductPriced {
    pub product_id: String,
    pub name: String,
    /// Minor units, within `1..=`[`limits::MAX_UNIT_PRICE`] like a line's.
    pub unit_price: Money,
}

impl ProductPriced {
    /// The bounds a product's catalog data is held to, at inventory's API
    /// and again when the event is read.
    pub fn validate(&self) -> Result<(), String> {
        limits::check_id("productId", &self.product_id)?;
        limits::check_text("name", &self.name, limits::MAX_PRODUCT_NAME_CHARS)?;
        limits::check_range("unitPrice", self.unit_price, 1, limits::MAX_UNIT_PRICE)
    }

    /// Its envelope at product version `version`, caused by request `request_id`.
    pub fn envelope(&self, version: i64, request_id: Uuid) -> Envelope {
        Envelope {
            event_id: Uuid::now_v7(),
            event_type: PRODUCT_PRICED.into(),
            schema_version: SCHEMA_VERSION,
            aggregate_type: AGGREGATE_TYPE.into(),
            aggregate_id: self.product_id.clone(),
            version,
            timestamp: Utc::now().trunc_subsecs(6),
            metadata: Metadata {
                correlation_id: request_id,
                causation_id: request_id,
            },
            payload: serde_json::to_value(self).expect("a product always serializes"),
        }
    }

    /// Parses wire bytes into a catalog event: the envelope must be a
    /// `ProductPriced` of the current schema about the product its payload
    /// names, at a positive version, within the bounds.
    pub fn decode(bytes: &[u8]) -> Result<(Envelope, ProductPriced), DecodeError> {
        let envelope: Envelope =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Envelope(e.to_string()))?;
        if envelope.event_type != PRODUCT_PRICED {
            return Err(DecodeError::UnknownType(envelope.event_type));
        }
        if envelope.schema_version != SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                event_type: envelope.event_type,
                version: envelope.schema_version,
                oldest: SCHEMA_VERSION,
                newest: SCHEMA_VERSION,
            });
        }
        let invalid = |reason: String| DecodeError::Payload {
            event_type: PRODUCT_PRICED.into(),
            reason,
        };
        let product: ProductPriced =
            serde_json::from_value(envelope.payload.clone()).map_err(|e| invalid(e.to_string()))?;
        product.validate().map_err(invalid)?;
        if envelope.aggregate_type != AGGREGATE_TYPE {
            return Err(invalid(format!(
                "aggregateType '{}' is not '{AGGREGATE_TYPE}'",
                envelope.aggregate_type
            )));
        }
        if envelope.aggregate_id != product.product_id {
            return Err(invalid(format!(
                "aggregateId '{}' is not the payload's productId '{}'",
                envelope.aggregate_id, product.product_id
            )));
        }
        if envelope.version < 1 {
            return Err(invalid(format!(
                "version must be positive, got {}",
                envelope.version
            )));
        }
        Ok((envelope, product))
    }
}

/// The subject token that stands for a product id: the id itself when it
/// is made of ASCII letters, digits, `-` and `_` only (what a subject token
/// can always hold), otherwise `~` and the hex of its UTF-8 bytes (a token
/// of the first kind never starts with `~`, so the two never meet).
pub fn subject_token(product_id: &str) -> String {
    let plain = !product_id.is_empty()
        && product_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return product_id.to_string();
    }
    let mut token = String::with_capacity(1 + 2 * product_id.len());
    token.push('~');
    for b in product_id.bytes() {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widget() -> ProductPriced {
        ProductPriced {
            product_id: "widget".into(),
            name: "A widget".into(),
            unit_price: 1_250,
        }
    }

    #[test]
    fn an_event_reads_back_as_written() {
        let envelope = widget().envelope(3, Uuid::now_v7());
        let (read, product) = ProductPriced::decode(&envelope.to_bytes()).unwrap();
        assert_eq!(read, envelope);
        assert_eq!(product, widget());
    }

    #[test]
    fn a_price_out_of_bounds_or_another_products_id_is_refused_with_the_reason() {
        let mut free = widget();
        free.unit_price = 0;
        let bytes = free.envelope(1, Uuid::now_v7()).to_bytes();
        let err = ProductPriced::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("unitPrice must be positive"), "{err}");

        let mut envelope = widget().envelope(1, Uuid::now_v7());
        envelope.aggregate_id = "gadget".into();
        let err = ProductPriced::decode(&envelope.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not the payload's productId 'widget'"),
            "{err}"
        );

        let mut envelope = widget().envelope(1, Uuid::now_v7());
        envelope.schema_version = 2;
        let err = ProductPriced::decode(&envelope.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("supported: 1 to 1"), "{err}");

        let mut envelope = widget().envelope(1, Uuid::now_v7());
        envelope.event_type = "OrderPlaced".into();
        assert_eq!(
            ProductPriced::decode(&envelope.to_bytes()).unwrap_err(),
            DecodeError::UnknownType("OrderPlaced".into())
        );
    }

    #[test]
    fn a_product_id_is_its_own_token_when_it_can_be_and_hex_otherwise() {
        assert_eq!(subject_token("widget-2_B"), "widget-2_B");
        assert_eq!(subject_token("a.b"), "~612e62");
        assert_eq!(subject_token("é"), "~c3a9");
        assert_eq!(subject_token("~61"), "~7e3631");
        for id in ["a b", "a*", "a>", "x.y.z", "~"] {
            let token = subject_token(id);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'~' || b == b'-' || b == b'_'),
                "{id}: {token}"
            );
        }
    }
}
