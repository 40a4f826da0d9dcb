-- A payment's id is derived from its order's (gateway::payment_id: a
-- name-based UUID of the order id), so the primary key on order_id already
-- makes it unique, and nothing looks a payment up by it: the unique index
-- on it was one more entry to write per saga for nothing.
ALTER TABLE payments DROP CONSTRAINT payments_payment_id_key;
