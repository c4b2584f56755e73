-- PIN tries reserved before the PIN is checked (SPEC §4). `pin_tries` keeps counting settled
-- consecutive wrong PINs; `pin_pending` counts tries reserved by requests still in flight, and
-- `pin_pending_at` is when the last one was reserved, so reservations a crashed process never
-- settled stop counting once they are stale. A card takes a new try only while
-- pin_tries + live pin_pending < 3.
ALTER TABLE cards ADD COLUMN pin_pending INTEGER NOT NULL DEFAULT 0 CHECK (pin_pending >= 0);
ALTER TABLE cards ADD COLUMN pin_pending_at TIMESTAMPTZ;
