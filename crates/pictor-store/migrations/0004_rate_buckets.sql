-- Per-key token buckets shared by a cluster's API nodes: tokens left and when they were
-- counted (seconds on the database's clock), for requests and for images.
CREATE TABLE rate_buckets (
    key_id TEXT PRIMARY KEY,
    requests_tokens DOUBLE PRECISION,
    requests_at DOUBLE PRECISION,
    images_tokens DOUBLE PRECISION,
    images_at DOUBLE PRECISION
);
