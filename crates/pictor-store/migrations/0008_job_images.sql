-- Images a job makes, so a worker claims no more jobs than its batch holds; and indexes
-- for the statements every worker runs every few seconds, so that they touch only what
-- they change: the reaper's (running jobs by lease, waiting jobs by deadline) and the
-- retention sweep's (ended jobs by when they ended).
ALTER TABLE jobs ADD COLUMN images BIGINT NOT NULL DEFAULT 1;
CREATE INDEX jobs_leases ON jobs (leased_until) WHERE state = 'running';
CREATE INDEX jobs_deadlines ON jobs (deadline) WHERE state = 'queued';
CREATE INDEX jobs_finished ON jobs (finished_at);
