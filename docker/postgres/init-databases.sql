-- Run once by the postgres image on an empty data directory
-- (mounted into /docker-entrypoint-initdb.d/). One database per service;
-- keep this list in step with DATABASES in scripts/lib.sh
-- (scripts/check-compose.py verifies it).
CREATE DATABASE saga_order;
CREATE DATABASE saga_payment;
CREATE DATABASE saga_inventory;
CREATE DATABASE saga_shipping;
