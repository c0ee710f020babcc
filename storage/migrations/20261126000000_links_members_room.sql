-- Members-only share links: a link whose members_room is set opens only for a current member of
-- that Matrix room (proven with a Matrix OpenID token), on top of holding the token. NULL is the
-- plain link, which is what every link issued before this column existed stays.
-- ADD COLUMN of a nullable TEXT column is the same statement on SQLite and Postgres.

ALTER TABLE links ADD COLUMN members_room TEXT;
