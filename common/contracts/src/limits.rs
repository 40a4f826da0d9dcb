//! Bounds on every input, in one place: what the HTTP APIs accept, what an
//! event may carry, and therefore how large an event can ever get.
//!
//! The bounds are chosen so that no sum of them can overflow an `i64` and the
//! largest possible event stays far below the broker's `max_payload` (1 MiB):
//! an order of [`MAX_LINES`] lines with ids of [`MAX_ID_CHARS`] four-byte
//! characters is about 70 KB as a PaymentProcessed. Arithmetic on money and
//! quantities is still checked everywhere; these bounds make overflow a
//! validation message instead of a server error.

/// Lines per order.
pub const MAX_LINES: usize = 100;
/// Units of one product on one line.
pub const MAX_QUANTITY: i64 = 1_000_000;
/// Price of one unit, in minor units (10 000 000.00).
pub const MAX_UNIT_PRICE: i64 = 1_000_000_000;
/// Largest order total: every line at its bounds (1e17 minor units; an i64 holds 9.2e18).
pub const MAX_TOTAL: i64 = MAX_LINES as i64 * MAX_QUANTITY * MAX_UNIT_PRICE;
/// Largest account balance, deposit, stock level or adjustment (1e15).
pub const MAX_AMOUNT: i64 = 1_000_000_000_000_000;
/// Characters of a customer, product or other id.
pub const MAX_ID_CHARS: usize = 128;
/// Characters of a product's name in the catalog.
pub const MAX_PRODUCT_NAME_CHARS: usize = 200;
/// Characters of one shipping address field.
pub const MAX_ADDRESS_FIELD_CHARS: usize = 200;
/// Characters of a failure reason carried by an event.
pub const MAX_REASON_CHARS: usize = 2_000;
/// Characters of a client's idempotency key.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 200;
/// Bytes of an HTTP request body (a maximal order is about 70 KB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Rows a list endpoint skips at most (`offset`).
pub const MAX_OFFSET: i64 = 1_000_000;

/// An id: not blank, at most [`MAX_ID_CHARS`] characters, no control
/// characters (Postgres refuses NUL, and none belongs in an id), no
/// surrounding whitespace.
pub fn check_id(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if value.trim() != value {
        return Err(format!(
            "{field} must not start or end with whitespace, got {value:?}"
        ));
    }
    check_text(field, value, MAX_ID_CHARS)
}

/// Free text: not blank, at most `max` characters, no control characters.
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(format!(
            "{field} must be at most {max} characters, got {chars}"
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{field} must not contain control characters, found U+{:04X}",
            c as u32
        ));
    }
    Ok(())
}

/// A failure reason as carried by events.
pub fn check_reason(field: &str, value: &str) -> Result<(), String> {
    check_text(field, value, MAX_REASON_CHARS)
}

/// `value` within `min..=max`, named in the message otherwise.
pub fn check_range(field: &str, value: i64, min: i64, max: i64) -> Result<(), String> {
    if value < min {
        return Err(if min == 1 {
            format!("{field} must be positive, got {value}")
        } else if min == 0 {
            format!("{field} must not be negative, got {value}")
        } else {
            format!("{field} must be at least {min}, got {value}")
        });
    }
    if value > max {
        return Err(format!("{field} must be at most {max}, got {value}"));
    }
    Ok(())
}

/// A reason this system writes, cut to what an event may carry and cleaned of
/// control characters, so a long list of short products never makes an
/// event that its consumers must refuse.
pub fn reason(text: impl Into<String>) -> String {
    let text: String = text
        .into()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() <= MAX_REASON_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_REASON_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounds_cannot_overflow_a_total() {
        assert!(
            (MAX_LINES as i64)
                .checked_mul(MAX_QUANTITY)
                .and_then(|v| v.checked_mul(MAX_UNIT_PRICE))
                .is_some()
        );
        assert!(MAX_TOTAL.checked_add(MAX_AMOUNT).is_some());
    }

    #[test]
    fn an_id_with_a_nul_is_refused_by_name() {
        assert_eq!(
            check_id("customerId", "al\0ice").unwrap_err(),
            "customerId must not contain control characters, found U+0000"
        );
    }

    #[test]
    fn an_overlong_id_is_refused_with_its_length() {
        let err = check_id("productId", &"x".repeat(3000)).unwrap_err();
        assert_eq!(err, "productId must be at most 128 characters, got 3000");
    }

    #[test]
    fn lengths_count_characters_not_bytes() {
        assert!(check_id("customerId", &"é".repeat(MAX_ID_CHARS)).is_ok());
    }

    #[test]
    fn ranges_say_which_side_was_crossed() {
        assert_eq!(
            check_range("quantity", 0, 1, 10).unwrap_err(),
            "quantity must be positive, got 0"
        );
        assert_eq!(
            check_range("quantity", 11, 1, 10).unwrap_err(),
            "quantity must be at most 10, got 11"
        );
    }

    #[test]
    fn a_long_reason_is_cut_to_what_an_event_may_carry() {
        let r = reason("x".repeat(10_000));
        assert_eq!(r.chars().count(), MAX_REASON_CHARS);
        assert!(check_reason("reason", &r).is_ok());
        assert_eq!(reason("a\nb"), "a b");
    }
}
