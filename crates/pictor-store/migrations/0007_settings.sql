-- Values every node of a cluster must agree on (the image-link signing key).
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
