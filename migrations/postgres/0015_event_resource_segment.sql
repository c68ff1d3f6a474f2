-- The resource's first path segment with its `/` (`svc12/` of
-- `svc12/api/v1/orders`; NULL for a resource without a `/`), filled by the
-- server on every insert (ingest, and the COPY of `bench reports`) with
-- `domain::event::resource_segment`, and here for the rows already stored.
--
-- Why: `events_resource` orders by resource first, so a resource prefix
-- filter reads every matching row of the range and sorts them before its
-- first page (p95 196 ms at 1 M events, issue 14). A prefix that is one
-- whole first segment (`svc12/`, the common "everything of this service"
-- filter) is the equality `resource_segment = 'svc12/'`, and this index
-- returns its rows already in page order. Other prefixes keep the range on
-- `events_resource`.
ALTER TABLE events ADD COLUMN resource_segment TEXT;
UPDATE events SET resource_segment = substr(resource, 1, strpos(resource, '/'))
    WHERE strpos(resource, '/') > 0;
CREATE INDEX events_resource_segment
    ON events (tenant_id, resource_segment, occurred_at DESC, id DESC)
    WHERE resource_segment IS NOT NULL;
