-- Incident timelines in rows of their own: the incident document no longer
-- carries its timeline, which grows with every change (an incident an alert
-- storm keeps linking into reached hundreds of kilobytes, read and rewritten
-- on every correlation). `timeline_len` counts the entries stored; a save
-- appends only the entries beyond it. Entries are never changed or removed.
CREATE TABLE incident_timeline (
    tenant_id   UUID NOT NULL,
    incident_id UUID NOT NULL,
    seq         BIGINT NOT NULL,
    entry       JSONB NOT NULL,
    PRIMARY KEY (tenant_id, incident_id, seq)
);
ALTER TABLE incident_timeline ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON incident_timeline
    USING (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('picket.tenant_id', true), '')::uuid);
GRANT SELECT, INSERT, UPDATE, DELETE ON incident_timeline TO picket_app;

ALTER TABLE incidents ADD COLUMN timeline_len BIGINT NOT NULL DEFAULT 0;
INSERT INTO incident_timeline (tenant_id, incident_id, seq, entry)
    SELECT i.tenant_id, i.id, t.n, t.e
    FROM incidents i, jsonb_array_elements(COALESCE(i.doc -> 'timeline', '[]'::jsonb)) WITH ORDINALITY AS t(e, n);
UPDATE incidents
    SET timeline_len = jsonb_array_length(COALESCE(doc -> 'timeline', '[]'::jsonb)),
        doc = doc - 'timeline';
