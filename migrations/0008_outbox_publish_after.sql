-- Alert messages a bridge publishes itself, from memory, right after the commit that wrote
-- them (bridge/outbox.py): their rows are leased to that bridge until publish_after, and the
-- periodic drain of any bridge takes only rows past it - those whose bridge died before the
-- broker acknowledged them. Rows written by the API keep the default: drained at once.
ALTER TABLE mqtt_outbox ADD COLUMN publish_after timestamptz NOT NULL DEFAULT now();
