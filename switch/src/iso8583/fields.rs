//! Field numbers of the Switchyard profile (SPEC §3), by name: code says `fields::STAN`, never
//! `11`. The packager's table of field formats (`field.rs`) stays indexed by number, as the
//! standard prints it.

/// 2 — primary account number.
pub const PAN: u8 = 2;
/// 3 — processing code (`31xx00` balance, `01xx00` withdrawal).
pub const PROCESSING_CODE: u8 = 3;
/// 4 — transaction amount, minor units.
pub const AMOUNT: u8 = 4;
/// 7 — transmission date-time, `MMDDhhmmss` UTC.
pub const TRANSMISSION_DATE_TIME: u8 = 7;
/// 11 — system trace audit number.
pub const STAN: u8 = 11;
/// 12 — local transaction time.
pub const LOCAL_TIME: u8 = 12;
/// 13 — local transaction date.
pub const LOCAL_DATE: u8 = 13;
/// 14 — card expiry, `YYMM`.
pub const EXPIRY: u8 = 14;
/// 22 — point-of-service entry mode.
pub const POS_ENTRY_MODE: u8 = 22;
/// 25 — point-of-service condition code.
pub const POS_CONDITION_CODE: u8 = 25;
/// 28 — transaction fee amount.
pub const FEE_AMOUNT: u8 = 28;
/// 32 — acquiring institution id.
pub const ACQUIRER_ID: u8 = 32;
/// 35 — track 2 equivalent data (`PAN=YYMM…`).
pub const TRACK2: u8 = 35;
/// 37 — retrieval reference number.
pub const RRN: u8 = 37;
/// 38 — authorization code.
pub const AUTH_CODE: u8 = 38;
/// 39 — response code.
pub const RESPONSE_CODE: u8 = 39;
/// 41 — card acceptor terminal id (terminal or station id).
pub const TERMINAL_ID: u8 = 41;
/// 42 — card acceptor id.
pub const CARD_ACCEPTOR_ID: u8 = 42;
/// 48 — additional data: the key type (`TPK`, `TAK`) of a key exchange.
pub const KEY_TYPE: u8 = 48;
/// 48 — additional data of a financial message on an upstream link: tag-length-value
/// elements ([`super::private_data`]), e.g. the W3C `traceparent` (`TP`).
pub const PRIVATE_DATA: u8 = 48;
/// 49 — transaction currency code.
pub const CURRENCY: u8 = 49;
/// 52 — PIN data (binary; the profile carries the PIN block in 123).
pub const PIN_DATA: u8 = 52;
/// 54 — additional amounts: ledger and available balance.
pub const ADDITIONAL_AMOUNTS: u8 = 54;
/// 64 — MAC of a message without a secondary bitmap.
pub const MAC: u8 = 64;
/// 70 — network management code (`001` sign-on, `002` sign-off, `301` echo, `161`/`162` key change).
pub const NETWORK_CODE: u8 = 70;
/// 90 — original data elements of a reversal (MTI, STAN, transmission date-time, …).
pub const ORIGINAL_DATA: u8 = 90;
/// 120 — key block (TR-31) of a key exchange.
pub const KEY_BLOCK: u8 = 120;
/// 122 — key check value of a key exchange.
pub const KCV: u8 = 122;
/// 123 — PIN block (format 4, hex).
pub const PIN_BLOCK: u8 = 123;
/// 127 — private use.
pub const PRIVATE_USE: u8 = 127;
/// 128 — MAC of a message with a secondary bitmap.
pub const MAC_SECONDARY: u8 = 128;
