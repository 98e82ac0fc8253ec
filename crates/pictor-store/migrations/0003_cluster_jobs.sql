-- The cluster's shared queue (PostgreSQL; the tables exist on SQLite too, unused there).
-- Times are Unix milliseconds of the database's clock, so nodes never compare clocks.
-- state: queued -> running -> done | failed | cancelled; a running job whose lease
-- expires goes back to queued (or to failed after max_attempts runs).
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    worker TEXT,
    leased_until BIGINT,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    created_at BIGINT NOT NULL,
    deadline BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX jobs_waiting ON jobs (state, model, created_at);

-- Workers alive and the models each serves (JSON), refreshed every few seconds.
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    models TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);
