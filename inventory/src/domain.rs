//! Reservation decisions: pure functions, no I/O.

use std::collections::{BTreeMap, HashMap};

use common::{compensation::StepState, event::OrderLine, limits};

/// Quantity per product, summed over lines, in product order (the order rows
/// are locked in, so concurrent reservations never deadlock). Sums are
/// checked: lines that do not fit an `i64` are refused, never wrapped into a
/// negative demand that would add stock.
pub fn demand(lines: &[OrderLine]) -> Result<BTreeMap<String, i64>, String> {
    let mut demand = BTreeMap::new();
    for line in lines {
        if line.quantity <= 0 {
            return Err(format!(
                "quantity of '{}' must be positive, got {}",
                line.product_id, line.quantity
            ));
        }
        let total: &mut i64 = demand.entry(line.product_id.clone()).or_insert(0);
        *total = total
            .checked_add(line.quantity)
            .ok_or_else(|| format!("total quantity of '{}' overflows", line.product_id))?;
    }
    Ok(demand)
}

/// Reserves every product of `demand` or none: `Ok` with the quantities to
/// move from available to reserved, or `Err` with why not.
pub fn decide_reservation(
    demand: &BTreeMap<String, i64>,
    available: &HashMap<String, i64>,
) -> Result<(), String> {
    let mut short = Vec::new();
    for (product, &wanted) in demand {
        match available.get(product) {
            None => short.push(format!("unknown product '{product}'")),
            Some(&have) if have < wanted => {
                short.push(format!("'{product}' requested {wanted}, available {have}"))
            }
            Some(_) => {}
        }
    }
    if short.is_empty() {
        Ok(())
    } else {
        Err(limits::reason(format!(
            "out of stock: {}",
            short.join("; ")
        )))
    }
}

/// State of an order's reservation, stored as its lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum ReservationStatus {
    Reserved,
    Failed,
    Released,
}

impl ReservationStatus {
    /// Where the reservation stands for a release: only reserved units go back.
    pub fn step_state(self) -> StepState {
        match self {
            ReservationStatus::Reserved => StepState::Done,
            ReservationStatus::Failed => StepState::Refused,
            ReservationStatus::Released => StepState::Compensated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(p: &str, q: i64) -> OrderLine {
        OrderLine {
            product_id: p.into(),
            quantity: q,
            unit_price: 1,
        }
    }

    fn stock(items: &[(&str, i64)]) -> HashMap<String, i64> {
        items.iter().map(|(p, q)| (p.to_string(), *q)).collect()
    }

    fn demand(lines: &[OrderLine]) -> BTreeMap<String, i64> {
        super::demand(lines).unwrap()
    }

    #[test]
    fn lines_whose_quantities_overflow_are_refused_not_wrapped() {
        // given two lines of i64::MAX (the sum would wrap to -2 and add stock)
        let err = super::demand(&[line("a", i64::MAX), line("a", i64::MAX)]).unwrap_err();
        // then the demand is refused, naming the product
        assert_eq!(err, "total quantity of 'a' overflows");
    }

    #[test]
    fn a_negative_quantity_is_never_demand() {
        assert!(super::demand(&[line("a", -5)]).is_err());
    }

    #[test]
    fn a_shortage_over_many_products_stays_within_a_reason() {
        let lines: Vec<_> = (0..100)
            .map(|i| line(&format!("{}{i}", "p".repeat(120)), 2))
            .collect();
        let err = decide_reservation(&demand(&lines), &stock(&[])).unwrap_err();
        assert!(limits::check_reason("reason", &err).is_ok());
    }

    #[test]
    fn lines_for_the_same_product_are_summed() {
        let d = demand(&[line("a", 2), line("b", 1), line("a", 3)]);
        assert_eq!(d.get("a"), Some(&5));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn a_reservation_within_stock_is_granted() {
        let d = demand(&[line("a", 2), line("b", 1)]);
        assert_eq!(
            decide_reservation(&d, &stock(&[("a", 2), ("b", 5)])),
            Ok(())
        );
    }

    #[test]
    fn one_short_line_refuses_the_whole_reservation() {
        // given plenty of a and one b, when two b are wanted with a
        let d = demand(&[line("a", 1), line("b", 2)]);
        let err = decide_reservation(&d, &stock(&[("a", 100), ("b", 1)])).unwrap_err();
        // then nothing is reserved and the reason names b
        assert_eq!(err, "out of stock: 'b' requested 2, available 1");
    }

    #[test]
    fn split_lines_that_together_exceed_stock_are_refused() {
        let d = demand(&[line("a", 2), line("a", 2)]);
        assert!(decide_reservation(&d, &stock(&[("a", 3)])).is_err());
    }

    #[test]
    fn an_unknown_product_is_named() {
        let err = decide_reservation(&demand(&[line("zz", 1)]), &stock(&[])).unwrap_err();
        assert!(err.contains("unknown product 'zz'"), "{err}");
    }

    #[test]
    fn only_a_held_reservation_is_released_and_only_once() {
        use ReservationStatus::*;
        use common::compensation::{Compensation::*, decide};
        let decided = [Reserved, Released, Failed].map(|status| decide(status.step_state()));
        assert_eq!(decided, [Undo, AlreadyUndone, NothingToUndo]);
    }
}
