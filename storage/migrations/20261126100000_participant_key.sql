-- The call adapter's key of a participant (user id + device for Matrix), the `id` of the
-- manifest's participants. Recovery after a restart rebuilds the manifest from the catalog and
-- needs it to tie tracks and rejoins to the same participant. Rows from before have none.
ALTER TABLE participants ADD COLUMN participant_key TEXT;
