\set i random(1, 1000000000)
\set k random(1, 500)
WITH claimed AS 
(INSERT INTO mb_a0dbc5be (id, status, token, lease_expires, expires, attempts, error, payload, created_at, updated_at) VALUES ('f' || :i || '-' || random()::VARCHAR, 'in_flight', 'tok'::VARCHAR, extract(epoch from now())::float8 + 60, extract(epoch from now())::float8 + 60, 1, NULL, NULL, extract(epoch from now())::float8, extract(epoch from now())::float8) ON CONFLICT (id) DO NOTHING RETURNING mb_a0dbc5be.id), 
turned AS 
(INSERT INTO mb_a0dbc5be_order (order_key, newest, expires, token, turn_ends) SELECT wanted.order_key AS order_key, NULL AS anon_3, 0, 'tok'::VARCHAR AS anon_4, extract(epoch from now())::float8 + 60 AS anon_5 
FROM unnest(ARRAY['k' || :k]::VARCHAR[]) WITH ORDINALITY AS wanted(order_key, n) 
WHERE EXISTS (SELECT claimed.id 
FROM claimed) ON CONFLICT (order_key) DO UPDATE SET token = excluded.token, turn_ends = excluded.turn_ends WHERE (mb_a0dbc5be_order.token = '' OR mb_a0dbc5be_order.turn_ends <= extract(epoch from now())::float8) AND (NOT (mb_a0dbc5be_order.newest IS NOT NULL AND mb_a0dbc5be_order.expires > extract(epoch from now())::float8) OR mb_a0dbc5be_order.newest <= :i::BIGINT) RETURNING mb_a0dbc5be_order.order_key)
 SELECT (SELECT count(*) AS count_1 
FROM claimed) AS anon_1, turned.order_key IS NOT NULL AS anon_2, mb_a0dbc5be_order.newest, mb_a0dbc5be_order.expires, mb_a0dbc5be_order.token, mb_a0dbc5be_order.turn_ends 
FROM unnest(ARRAY['k' || :k]::VARCHAR[]) WITH ORDINALITY AS wanted(order_key, n) LEFT OUTER JOIN turned ON turned.order_key = wanted.order_key LEFT OUTER JOIN mb_a0dbc5be_order ON mb_a0dbc5be_order.order_key = wanted.order_key ORDER BY wanted.n;
