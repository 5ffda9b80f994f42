"""Codec cost: µs per decode/encode of a typical 0200, pyiso8583 vs our fast codec.

    .venv/bin/python bench/bench_codec.py [--repeat 7] [--number 20000]

Prints the median of several runs per case and the speed-up ratio; the two
codecs are measured in the same run on the same message.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import iso8583

from cardswitch.iso8583.dialect import ASCII, BINARY

TYPICAL_0200 = {
    "t": "0200",
    "2": "4761739001010010",
    "3": "000000",
    "4": "000000012345",
    "7": "1128134501",
    "11": "123456",
    "12": "134501",
    "13": "1128",
    "14": "2712",
    "18": "5411",
    "22": "051",
    "25": "00",
    "35": "4761739001010010=27122011143804400000",
    "41": "TERM0001",
    "42": "MERCHANT0000001",
    "49": "840",
    "52": "0123456789ABCDEF",
    "55": "9F2608C2C12B098F3DA6E39F2701809F10120110A0000F040000000000000000000000FF9F3704A3F1B2C4",
    "60": "000001",
    "64": "FEDCBA9876543210",
}


def _median_us(fn, repeat: int, number: int) -> float:
    runs = timeit.repeat(fn, repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=20000)
    a = ap.parse_args()
    print(f"{'dialect':8} {'op':7} {'pyiso8583 µs':>13} {'fast µs':>9} {'speed-up':>9}")
    for d in (ASCII, BINARY):
        raw = d.encode(TYPICAL_0200)
        assert raw == d.reference_encode(TYPICAL_0200)
        assert d.decode(raw) == d.reference_decode(raw) == TYPICAL_0200
        spec = d.spec
        cases = {
            "decode": (lambda: iso8583.decode(raw, spec), lambda: d.decode(raw)),
            "encode": (lambda: iso8583.encode(dict(TYPICAL_0200), spec), lambda: d.encode(TYPICAL_0200)),
        }
        for op, (ref, fast) in cases.items():
            r = _median_us(ref, a.repeat, a.number // 5)
            f = _median_us(fast, a.repeat, a.number)
            print(f"{d.name:8} {op:7} {r:13.2f} {f:9.2f} {r / f:8.1f}x")


if __name__ == "__main__":
    main()
