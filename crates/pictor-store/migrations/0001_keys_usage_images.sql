-- Keys are stored only as SHA-256 hashes of the secret; `prefix` is the first characters
-- of the secret, shown in listings so users can tell keys apart.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

-- One row per served request.
CREATE TABLE usage_events (
    key_id TEXT NOT NULL,
    at BIGINT NOT NULL,
    images BIGINT NOT NULL,
    pixels BIGINT NOT NULL,
    seconds DOUBLE PRECISION NOT NULL
);
CREATE INDEX usage_events_key ON usage_events (key_id);

-- Stored images behind signed links; the sweeper deletes expired ones.
CREATE TABLE images (
    id TEXT PRIMARY KEY,
    content_type TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX images_expiry ON images (expires_at);
