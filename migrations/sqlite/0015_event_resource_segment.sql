-- The resource's first path segment with its `/`, indexed in page order
-- within the segment: see migrations/postgres/0015_event_resource_segment.sql.
-- instr and substr count characters, and `/` is one byte, so the segment is
-- the same string the server computes.
ALTER TABLE events ADD COLUMN resource_segment TEXT;
UPDATE events SET resource_segment = substr(resource, 1, instr(resource, '/'))
    WHERE instr(resource, '/') > 0;
CREATE INDEX events_resource_segment
    ON events (tenant_id, resource_segment, occurred_at DESC, id DESC)
    WHERE resource_segment IS NOT NULL;
