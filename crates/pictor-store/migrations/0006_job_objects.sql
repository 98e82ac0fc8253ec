-- Pixels passed between a cluster's nodes while the image store is out of reach (bounded
-- by the jobs in flight; deleted once read).
CREATE TABLE job_objects (
    name TEXT PRIMARY KEY,
    bytes BYTEA NOT NULL
);
