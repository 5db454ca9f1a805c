\set i random(1, 1000000000)
\set k random(1, 500)
INSERT INTO mb_a0dbc5be (id, status, token, lease_expires, expires, attempts, error, payload, created_at, updated_at) VALUES ('e' || :i || '-' || random()::VARCHAR, 'in_flight', 'tok'::VARCHAR, extract(epoch from now())::float8 + 60, extract(epoch from now())::float8 + 60, 1, NULL, NULL, extract(epoch from now())::float8, extract(epoch from now())::float8) ON CONFLICT (id) DO NOTHING;
