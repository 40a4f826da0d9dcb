//! Shipment decisions: pure functions, no I/O.

use common::event::Address;
use uuid::Uuid;

/// Destinations the carrier delivers to (ISO 3166-1 alpha-2).
pub const SUPPORTED_COUNTRIES: &[&str] = &[
    "AT", "AU", "BE", "CA", "CH", "DE", "DK", "ES", "FI", "FR", "GB", "IE", "IT", "JP", "NL", "NO",
    "NZ", "PL", "PT", "SE", "US",
];

/// State of an order's shipment, stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum ShipmentStatus {
    Created,
    Failed,
    /// Called off: the customer cancelled the order after it was created.
    Cancelled,
}

impl ShipmentStatus {
    /// As far as calling it off goes.
    pub fn step_state(self) -> common::compensation::StepState {
        use common::compensation::StepState;
        match self {
            ShipmentStatus::Created => StepState::Done,
            ShipmentStatus::Failed => StepState::Refused,
            ShipmentStatus::Cancelled => StepState::Compensated,
        }
    }
}

/// Whether the carrier can deliver to `address`; `Err` says why not. Every
/// field is present and bounded already: the event carrying it was checked
/// with [`common::event::validate_address`] before any handler saw it.
pub fn validate_address(address: &Address) -> Result<(), String> {
    if address.is_unsplit() {
        return Err(format!(
            "address rejected: '{}' could not be read as name, street, city, postal code and country",
            address.street
        ));
    }
    if !SUPPORTED_COUNTRIES.contains(&address.country.as_str()) {
        return Err(format!(
            "address rejected: no delivery to country '{}'",
            address.country
        ));
    }
    let postal = address.postal_code.trim();
    let well_formed = (3..=10).contains(&postal.len())
        && postal
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == ' ' || c == '-')
        && postal.chars().any(|c| c.is_ascii_digit());
    if !well_formed {
        return Err(format!(
            "address rejected: postal code '{}' is not valid",
            address.postal_code
        ));
    }
    Ok(())
}

/// Carrier tracking number derived from the shipment id (stable on retry).
pub fn tracking_number(shipment_id: Uuid) -> String {
    let simple = shipment_id.simple().to_string().to_uppercase();
    format!("TRK{}", &simple[simple.len() - 12..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(country: &str, postal: &str) -> Address {
        Address {
            postal_code: postal.into(),
            country: country.into(),
            ..Address::example()
        }
    }

    #[test]
    fn a_complete_address_in_a_served_country_is_accepted() {
        assert_eq!(validate_address(&address("US", "12345")), Ok(()));
        assert_eq!(validate_address(&address("GB", "SW1A 1AA")), Ok(()));
    }

    #[test]
    fn an_address_line_that_could_not_be_split_is_rejected_with_the_line() {
        let err = validate_address(&Address::unsplit("behind the mill")).unwrap_err();
        assert!(err.contains("'behind the mill' could not be read"), "{err}");
    }

    #[test]
    fn an_unserved_country_is_rejected_by_name() {
        let err = validate_address(&address("ZZ", "12345")).unwrap_err();
        assert_eq!(err, "address rejected: no delivery to country 'ZZ'");
    }

    #[test]
    fn a_postal_code_without_digits_is_rejected() {
        assert!(validate_address(&address("US", "ABCDE")).is_err());
    }

    #[test]
    fn an_empty_field_never_reaches_the_carrier_check() {
        let mut a = address("US", "12345");
        a.street = "  ".into();
        assert_eq!(
            common::event::validate_address("shippingAddress", &a).unwrap_err(),
            "shippingAddress.street must not be empty"
        );
    }

    #[test]
    fn the_tracking_number_is_stable_for_a_shipment() {
        let id = Uuid::now_v7();
        assert_eq!(tracking_number(id), tracking_number(id));
        assert_eq!(tracking_number(id).len(), 15);
    }
}
