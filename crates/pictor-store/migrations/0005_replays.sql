-- Detached runs shared by a cluster's API nodes: an Idempotency-Key's (or an SDK
-- attempt's) run, the job it waits on, and once done where its response body is stored.
-- Times are Unix milliseconds of the API nodes' clocks.
CREATE TABLE replays (
    scope TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    node TEXT NOT NULL,
    job_id TEXT,
    body_key TEXT,
    heartbeat_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
