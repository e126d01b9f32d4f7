-- Issue 6.2: nothing of a deleted organization may reach a later one of the same slug.

-- Quarantine is keyed by organization id (ids are never reused), not by slug. The bridge
-- fills it; a message of an organization it does not know gets NULL, which only
-- superusers see. Rows written before this migration keep the organization that held the
-- slug when they arrived; rows older than that organization belonged to an earlier one.
ALTER TABLE quarantine ADD COLUMN org_id bigint;
UPDATE quarantine q SET org_id = o.id FROM organizations o
WHERE o.slug = q.org_slug AND q.received_at >= o.created_at;
DROP INDEX IF EXISTS quarantine_org_received_at;
CREATE INDEX quarantine_org_id ON quarantine (org_id, id DESC);

-- The bridge caches (org slug, device slug) -> device id. Deleting or renaming a device
-- or an organization bumps this counter in the same transaction; the bridge reads it
-- before each batch and drops its cache when it moved. A device re-created under the
-- same slugs can only publish after the deletion committed, so the batch holding its
-- first message always sees the new value: its readings never land under the old id.
CREATE TABLE device_directory_version (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    n   bigint NOT NULL
);
INSERT INTO device_directory_version (one, n) VALUES (true, 0);

CREATE FUNCTION bump_device_directory_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE device_directory_version SET n = n + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_directory_changed AFTER DELETE OR UPDATE OF slug, org_id ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION bump_device_directory_version();
CREATE TRIGGER organizations_directory_changed AFTER DELETE OR UPDATE OF slug ON organizations
    FOR EACH STATEMENT EXECUTE FUNCTION bump_device_directory_version();
