-- An idempotency key belongs to the customer who sent it (another customer's
-- identical key is another request), and remembers a digest of the request
-- it was first used with, so a reused key with a different body is refused
-- instead of answered with the first order. Rows from before have no digest
-- and match any body.
ALTER TABLE place_requests ADD COLUMN customer_id TEXT, ADD COLUMN request_hash BYTEA;
UPDATE place_requests p SET customer_id = o.customer_id FROM orders o WHERE o.order_id = p.order_id;
DELETE FROM place_requests WHERE customer_id IS NULL;
ALTER TABLE place_requests ALTER COLUMN customer_id SET NOT NULL;
ALTER TABLE place_requests DROP CONSTRAINT place_requests_pkey;
ALTER TABLE place_requests ADD PRIMARY KEY (customer_id, idempotency_key);
