-- A shipment the customer's cancel called off after it was created.
ALTER TABLE shipments DROP CONSTRAINT shipments_status_check;
ALTER TABLE shipments ADD CONSTRAINT shipments_status_check
    CHECK (status IN ('created', 'failed', 'cancelled'));
