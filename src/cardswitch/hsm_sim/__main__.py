"""``python -m cardswitch.hsm_sim``: the HSM simulator on its own (benchmarks, manual tests).

Prints ``ready <port>`` on stdout once listening; stops on SIGTERM/SIGINT
or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from cardswitch.hsm_sim.lmk import Lmk, LmkError
from cardswitch.hsm_sim.server import HsmOptions, HsmServer, parse_overrides


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cardswitch.hsm_sim", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1500, help="0 picks a free port (printed)")
    ap.add_argument("--header-len", type=int, default=4)
    ap.add_argument("--lmk-file", default="", help="LMK set, one 'NN HEX32' line per pair")
    ap.add_argument("--latency", action="append", default=[], metavar="CMD=MS")
    ap.add_argument("--fail", action="append", default=[], metavar="CMD=down|close|NN")
    ap.add_argument("--disable", action="append", default=[], metavar="CMD")
    ap.add_argument("--max-seconds", type=float, default=0, help="stop after this long (0: never)")
    ap.add_argument("--no-uvloop", action="store_true")
    return ap.parse_args(argv)


async def _serve(args: argparse.Namespace, options: HsmOptions, lmk: Lmk) -> None:
    server = HsmServer(options, lmk=lmk, host=args.host, port=args.port)
    await server.start()
    print(f"ready {server.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.max_seconds > 0:
        loop.call_later(args.max_seconds, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    try:
        lmk = Lmk.from_file(args.lmk_file) if args.lmk_file else Lmk.test()
        options = HsmOptions(
            header_len=args.header_len,
            latency_ms={c: float(v) for c, v in parse_overrides(args.latency, "--latency").items()},
            fail=parse_overrides(args.fail, "--fail"),
            disabled=frozenset(args.disable),
        )
        HsmServer(options, lmk=lmk)      # validates the options before anything listens
    except (LmkError, ValueError) as e:
        print(f"hsm_sim: {e}", file=sys.stderr)
        return 2
    if not args.no_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:   # pragma: no cover
            pass
    try:
        asyncio.run(_serve(args, options, lmk))
    except OSError as e:
        print(f"hsm_sim: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
