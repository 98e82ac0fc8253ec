-- Per-key rate limits; NULL means unlimited.
ALTER TABLE api_keys ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE api_keys ADD COLUMN images_per_minute BIGINT;
