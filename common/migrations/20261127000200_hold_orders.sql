-- Holds the orders of `ids` for the calling transaction: one advisory lock
-- per order, taken in order of id, so that two holders of several orders
-- never wait on each other in a cycle. A service's forward step for an order
-- and the customer's cancel of it take turns (compensation::hold_order).
CREATE OR REPLACE FUNCTION hold_orders(ids UUID[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM count(pg_advisory_xact_lock(hashtextextended(id::text, 11)))
       FROM (SELECT id FROM unnest(ids) AS id ORDER BY id) held;
END
$$;

-- hold_orders, then fails with SQLSTATE SG001 if this service recorded a
-- cancel for any of the orders: what a transaction about to take their
-- forward steps asks first (compensation::Cancels::begin). The function is
-- volatile, so the check takes a snapshot of its own, after the holds: it
-- sees every cancel committed before them.
CREATE OR REPLACE FUNCTION hold_orders_not_cancelled(ids UUID[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM hold_orders(ids);
    IF EXISTS (SELECT 1 FROM cancelled_orders WHERE order_id = ANY (ids)) THEN
        RAISE EXCEPTION 'a cancel is recorded for an order held' USING ERRCODE = 'SG001';
    END IF;
END
$$;
