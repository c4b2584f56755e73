#!/usr/bin/env python3
"""Regenerate the golden ISO 8583 vectors used by `switch/src/iso8583/packager.rs` tests.

Packs a few Switchyard-profile messages with the independent pyiso8583 library under its
`default_ascii` spec (our `ascii` packager) and `default` spec (our `binary-bitmap` packager)
and prints the wire bytes as hex, so that a change in either implementation shows up as a
mismatch against a library we did not write.

    python3 -m venv /tmp/pyv && /tmp/pyv/bin/pip install pyiso8583
    /tmp/pyv/bin/python switch/tests/vectors/gen_vectors.py            # golden vectors
    /tmp/pyv/bin/python switch/tests/vectors/gen_vectors.py --random 60 \
        > switch/tests/vectors/pyiso8583_random.txt                   # random vectors

Random vectors are one message per line: `<packager> <wire hex> <n>=<value hex>,...`, where
the values are the logical content as hex (text bytes for text fields, raw bytes for binary
fields). They cover every field pyiso8583 and we both carry, at random lengths.

pyiso8583 takes binary fields (52, 55, 64, 96, 128 in `default`) as hex strings; in
`default_ascii` the same hex strings are the wire text, which is exactly how our codec
treats them (raw bytes in memory, hex on an ASCII wire).
"""

import copy
import random
import sys

import iso8583
from iso8583.specs import default, default_ascii

# Field values are the logical content; binary fields are given as hex.
VECTORS = {
    "sign_on_0800": {
        "t": "0800",
        "7": "1122093015",
        "11": "000123",
        "41": "ATM00001",
        "70": "001",
    },
    "withdrawal_0200": {
        "t": "0200",
        "2": "6011000000000004",
        "3": "011000",
        "4": "000000050000",
        "7": "1122093015",
        "11": "000124",
        "12": "163015",
        "13": "1122",
        "14": "2812",
        "22": "051",
        "35": "6011000000000004=2812101",
        "37": "432109876543",
        "41": "ATM00001",
        "42": "SWITCHYARD-0001",
        "49": "360",
        "123": "4A1B2C3D4E5F60718293A4B5C6D7E8F9",
        "64": "0123456789ABCDEF",
    },
    "reversal_0420_secondary": {
        "t": "0420",
        "2": "6011000000000004",
        "3": "011000",
        "4": "000000050000",
        "7": "1122093115",
        "11": "000125",
        "39": "00",
        "41": "ATM00001",
        "49": "360",
        "90": "020000012411220930150000000000000000000000",
        "128": "FEDCBA9876543210",
    },
    "binary_fields_0200": {
        "t": "0200",
        "3": "311000",
        "11": "000126",
        "41": "ATM00001",
        "52": "00112233445566FF",
        "55": "9F2608A1B2C3D4E5F60718",
        "64": "A0A1A2A3A4A5A6A7",
    },
    "key_change_0810": {
        "t": "0810",
        "7": "1122093015",
        "11": "000127",
        "39": "00",
        "41": "ATM00001",
        "48": "TPK",
        "70": "161",
        "120": "D0112P0AE00E0000B3F1C2E5A6D7980112233445566778899AABBCCDDEEFF0011",
        "122": "1A2B3C",
    },
}


# Character classes of our field table (switch/src/iso8583/field.rs), so that the random
# values are valid for our codec too; pyiso8583 itself does not check characters.
NUMERIC = {*range(2, 28), 32, 33, 49, 50, 51, 53, *range(66, 91), 99, 100}
ALPHANUMERIC = {28, 29, 30, 31, 37, 38, 39, 40, 44, 54, 91, 92, 93, 94, 95, 97}
TRACK = {35, 36}
BINARY = {52, 55, 64, 96, 128}
NOT_CARRIED = {65}  # tertiary bitmap indicator in pyiso8583 2.x+, refused by our codec

DIGITS = "0123456789"
ALNUM = DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz "
PRINTABLE = ALNUM + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def random_value(rng: random.Random, n: int, field: dict, ascii_wire: bool) -> str:
    """A random logical value for field n as pyiso8583 takes it (hex for binary fields)."""
    max_len = field["max_len"]
    if n in BINARY:
        max_bytes = max_len // 2 if ascii_wire else max_len
        count = max_bytes if field["len_type"] == 0 else rng.randint(0, min(max_bytes, 24))
        return bytes(rng.randrange(256) for _ in range(count)).hex().upper()
    length = max_len if field["len_type"] == 0 else rng.randint(0, min(max_len, 48))
    alphabet = (
        DIGITS
        if n in NUMERIC
        else ALNUM
        if n in ALPHANUMERIC
        else DIGITS + "=D"
        if n in TRACK
        else PRINTABLE
    )
    return "".join(rng.choice(alphabet) for _ in range(length))


def random_vectors(count: int) -> None:
    rng = random.Random(8583)
    candidates = [n for n in range(2, 129) if n not in NOT_CARRIED]
    for spec_name, spec in (("ascii", default_ascii), ("binary-bitmap", default)):
        for _ in range(count):
            doc = {"t": "%04d" % rng.randrange(10000)}
            for n in rng.sample(candidates, rng.randint(1, 30)):
                doc[str(n)] = random_value(rng, n, spec[str(n)], spec_name == "ascii")
            raw, _ = iso8583.encode(copy.deepcopy(doc), spec)
            back, _ = iso8583.decode(bytes(raw), spec)
            assert all(back[k] == v for k, v in doc.items()), (spec_name, doc)
            values = ",".join(
                f"{n}={doc[str(n)] if n in BINARY else doc[str(n)].encode('ascii').hex().upper()}"
                for n in sorted(int(k) for k in doc if k != "t")
            )
            print(f"{spec_name} {bytes(raw).hex().upper()} t={doc['t']},{values}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--random":
        random_vectors(int(sys.argv[2]))
        return
    for spec_name, spec in (("ascii", default_ascii), ("binary-bitmap", default)):
        for name, doc in VECTORS.items():
            raw, _ = iso8583.encode(copy.deepcopy(doc), spec)
            back, _ = iso8583.decode(bytes(raw), spec)
            for key, value in doc.items():
                assert back[key] == value, (spec_name, name, key, back[key], value)
            print(f"{spec_name:13} {name:25} {bytes(raw).hex().upper()}")


if __name__ == "__main__":
    main()
