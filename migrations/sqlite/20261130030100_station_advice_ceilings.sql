-- Force-post ceilings per acquirer station (issue 10): what an issuer books from a station's
-- 0220/0221 advices per UTC day. An advice whose amount would take the day's total above the
-- station's ceiling is refused (`61`) before anything is journaled, so an operator who raises
-- the ceiling can requeue the acquirer's dead letter and have it booked. Expand-only: a new table.
CREATE TABLE station_advice_days (
    station_id  TEXT NOT NULL,
    day         TEXT NOT NULL,
    total       INTEGER NOT NULL CHECK (total >= 0),
    PRIMARY KEY (station_id, day)
);
