-- Incident timelines in rows of their own: same as migrations/postgres/0012.
CREATE TABLE incident_timeline (
    tenant_id   TEXT NOT NULL,
    incident_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    entry       TEXT NOT NULL,
    PRIMARY KEY (tenant_id, incident_id, seq)
);

ALTER TABLE incidents ADD COLUMN timeline_len INTEGER NOT NULL DEFAULT 0;
INSERT INTO incident_timeline (tenant_id, incident_id, seq, entry)
    SELECT i.tenant_id, i.id, t.key + 1, t.value
    FROM incidents i, json_each(i.doc, '$.timeline') AS t;
UPDATE incidents
    SET timeline_len = COALESCE(json_array_length(doc, '$.timeline'), 0),
        doc = json_remove(doc, '$.timeline');
