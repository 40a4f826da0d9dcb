//! Pricing a placement's lines from the catalog: the server owns prices.
//! Pure: the catalog entries come in, the priced lines or a refusal go out.
//!
//! A line names a product and a quantity; its unit price is the catalog's.
//! A client may send `unitPrice` too (the price it showed its customer):
//! then it must be the catalog's, or the placement is refused with both
//! prices, so nobody is charged a price they did not see. A product the
//! catalog does not have (unknown, or priced at inventory so recently that
//! the event has not arrived yet) is refused by name.

use std::collections::HashMap;

use common::event::{self, Money, OrderLine};
use serde::{Deserialize, Serialize};

/// One line of a placement request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestedLine {
    pub product_id: String,
    pub quantity: i64,
    /// If sent, must be the catalog's price (minor units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub unit_price: Option<Money>,
}

/// The shape of the lines, before the catalog is asked: at least one and
/// at most [`limits::MAX_LINES`], each with a valid product id, a quantity
/// and (if sent) a unit price within the bounds.
pub fn check(lines: &[RequestedLine]) -> Result<(), String> {
    event::check_lines(
        lines
            .iter()
            .map(|l| (l.product_id.as_str(), l.quantity, l.unit_price)),
    )
}

/// A product's price in the catalog, and the version it was priced at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub unit_price: Money,
    pub version: i64,
}

/// The lines priced from `catalog` (by product id), in the request's order.
pub fn price(
    lines: Vec<RequestedLine>,
    catalog: &HashMap<String, Price>,
) -> Result<Vec<OrderLine>, String> {
    lines
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let Some(price) = catalog.get(&line.product_id) else {
                return Err(format!(
                    "lines[{i}]: product '{}' is not in the catalog (a product is priced with PUT /products/{{id}} at inventory; its price reaches this service within moments)",
                    line.product_id
                ));
            };
            if let Some(sent) = line.unit_price
                && sent != price.unit_price
            {
                return Err(format!(
                    "lines[{i}].unitPrice {sent} is not the catalog price {} of product '{}' (version {}); leave unitPrice out to be charged the catalog price",
                    price.unit_price, line.product_id, price.version
                ));
            }
            Ok(OrderLine {
                product_id: line.product_id,
                quantity: line.quantity,
                unit_price: price.unit_price,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(product: &str, quantity: i64, unit_price: Option<Money>) -> RequestedLine {
        RequestedLine {
            product_id: product.into(),
            quantity,
            unit_price,
        }
    }

    fn catalog() -> HashMap<String, Price> {
        HashMap::from([(
            "widget".to_string(),
            Price {
                unit_price: 1_250,
                version: 3,
            },
        )])
    }

    #[test]
    fn given_a_priced_product_when_a_line_sends_no_price_then_it_gets_the_catalogs() {
        let priced = price(vec![line("widget", 2, None)], &catalog()).unwrap();
        assert_eq!(
            priced,
            vec![OrderLine {
                product_id: "widget".into(),
                quantity: 2,
                unit_price: 1_250
            }]
        );
    }

    #[test]
    fn given_a_priced_product_when_a_line_sends_the_same_price_then_it_is_accepted() {
        let priced = price(vec![line("widget", 1, Some(1_250))], &catalog()).unwrap();
        assert_eq!(priced[0].unit_price, 1_250);
    }

    #[test]
    fn given_a_priced_product_when_a_line_sends_another_price_then_both_prices_are_named() {
        let err = price(vec![line("widget", 1, Some(1))], &catalog()).unwrap_err();
        assert_eq!(
            err,
            "lines[0].unitPrice 1 is not the catalog price 1250 of product 'widget' (version 3); leave unitPrice out to be charged the catalog price"
        );
    }

    #[test]
    fn given_an_unknown_product_when_it_is_ordered_then_the_line_and_product_are_named() {
        let err = price(
            vec![line("widget", 1, None), line("gadget", 1, None)],
            &catalog(),
        )
        .unwrap_err();
        assert!(
            err.starts_with("lines[1]: product 'gadget' is not in the catalog"),
            "{err}"
        );
    }

    #[test]
    fn the_shape_is_checked_before_the_catalog_is_asked() {
        assert_eq!(check(&[]).unwrap_err(), "lines must not be empty");
        assert_eq!(
            check(&[line("widget", 0, None)]).unwrap_err(),
            "lines[0].quantity must be positive, got 0"
        );
        assert_eq!(
            check(&[line("widget", 1, Some(-5))]).unwrap_err(),
            "lines[0].unitPrice must be positive, got -5"
        );
        let many = vec![line("widget", 1, None); common::limits::MAX_LINES + 1];
        assert!(check(&many).unwrap_err().contains("at most 100 lines"));
        assert!(check(&[line("widget", 1, None)]).is_ok());
    }
}
