"""The `cardswitch` command.

Errors a user can cause are one clear line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from cardswitch.config import Endpoint, Network

EXIT_USAGE = 2


class CliError(Exception):
    """A problem the user can fix; printed as one line."""


def _load(path: str | None) -> Network:
    from cardswitch.netfile import NetworkFileError, load_network

    try:
        return load_network(path)
    except NetworkFileError as e:
        raise CliError(str(e)) from None
    except FileNotFoundError:
        raise CliError(f"{path}: no such network file") from None


def _setup_logging(verbose: bool = False) -> None:
    from cardswitch.logs import setup_logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)


def _uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency; this keeps odd platforms going
        pass


# -- check ---------------------------------------------------------------------------


def cmd_check(args) -> int:
    from cardswitch.netfile import describe

    print(describe(_load(args.config)))
    return 0


# -- up: the parent starts each part as its own process -------------------------------

PARTS = ("hsm", "banks", "switch")   # start order: the banks and the switch use the HSM


def _accepting(ep: Endpoint) -> bool:
    try:
        with socket.create_connection((ep.host, ep.port), timeout=0.2):
            return True
    except OSError:
        return False


def _part_endpoints(net: Network, part: str) -> list[Endpoint]:
    if part == "switch":
        return [net.switch.listen, net.switch.admin]
    if part == "banks":
        return [b.host for b in net.banks if b.simulate]
    if part == "hsm":
        return [net.hsm.listen] if net.hsm.simulate else []
    return []


def _wait_accepting(endpoints: list[Endpoint], procs: list[subprocess.Popen], timeout: float) -> None:
    end = time.monotonic() + timeout
    pending = list(endpoints)
    while pending:
        for p in procs:
            if p.poll() is not None:
                raise CliError(f"a part exited with code {p.returncode} while starting (see the lines above)")
        pending = [ep for ep in pending if not _accepting(ep)]
        if not pending:
            return
        if time.monotonic() > end:
            raise CliError(f"not listening after {timeout:.0f}s: {', '.join(map(str, pending))}")
        time.sleep(0.05)


MAX_WORKERS = 10   # worker index K is one digit of the RRN sequence (switch.app.MAX_NODES)


def workers_problem(net: Network, workers: int) -> str | None:
    """Why ``--workers N`` cannot run on ``net`` (one line), or None."""
    from cardswitch.switch.journals import is_postgres_url

    if not 1 <= workers <= MAX_WORKERS:
        return f"--workers {workers}: expected 1 to {MAX_WORKERS}"
    if net.switch.node_id + workers > MAX_WORKERS:
        return (f"--workers {workers} with [switch] node_id = {net.switch.node_id}: node numbers "
                f"node_id .. node_id + workers - 1 must stay within 0-{MAX_WORKERS - 1}")
    if workers == 1:
        return None
    if not is_postgres_url(net.switch.journal):
        return (f"--workers {workers} needs [switch] journal = postgresql://... "
                f"(SQLite has one writer)")
    if not net.switch.redis:
        return (f"--workers {workers} needs [switch] redis = redis://... "
                f"(the workers share duplicate detection)")
    return None


def _listening_pid(pid: int, port: int) -> bool:
    """True once process ``pid`` holds a listening TCP socket on ``port`` (Linux /proc).

    With SO_REUSEPORT a connect may reach any worker, so "accepting" cannot
    tell that a given worker is up; its own listening socket can."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return False


def _wait_workers_listening(workers: list[subprocess.Popen], port: int, procs: list[subprocess.Popen],
                            timeout: float) -> None:
    end = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for p in procs:
            if p.poll() is not None:
                raise CliError(f"a part exited with code {p.returncode} while starting (see the lines above)")
        pending = [w for w in pending if not _listening_pid(w.pid, port)]
        if not pending:
            return
        if time.monotonic() > end:
            raise CliError(f"{len(pending)} switch worker(s) not listening on port {port} after {timeout:.0f}s")
        time.sleep(0.05)


def cmd_up(args) -> int:
    net = _load(args.config)
    parts = PARTS if not args.only else tuple(p.strip() for p in args.only.split(","))
    for p in parts:
        if p not in PARTS:
            raise CliError(f"--only: unknown part {p!r} (parts: {', '.join(PARTS)})")
    workers = args.workers
    if "switch" in parts:
        problem = workers_problem(net, workers)
        if problem:
            raise CliError(problem)
    procs: list[subprocess.Popen] = []
    stopping = False

    def stop(signum=None, frame=None) -> None:
        nonlocal stopping
        stopping = True

    def stop_parts() -> int:
        """Stop in reverse start order: the switch drains (and delivers what it
        owes the banks) before the banks go away."""
        code = 0
        for pr in reversed(procs):
            if pr.poll() is None:
                pr.send_signal(signal.SIGTERM)
            try:
                rc = pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()
                rc = pr.wait()
            code = code or (0 if rc in (0, -signal.SIGTERM) else rc)
        return code

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, stop)
    base = [sys.executable, "-m", "cardswitch.cli", "serve"]
    cfg = ["-c", args.config] if args.config else []
    try:
        for part in [p for p in PARTS if p in parts]:   # banks first: the switch signs on to them
            if not _part_endpoints(net, part):
                continue
            if part == "switch" and workers > 1:
                # Worker 0 first, alone: it recovers what the last run left open and
                # serves the admin port; then the others join it on the same port.
                extra = ["--workers", str(workers)]
                procs.append(subprocess.Popen(base + [part, "--worker", "0"] + extra + cfg,
                                              start_new_session=True, preexec_fn=_die_with_parent))
                _wait_accepting(_part_endpoints(net, part), procs, timeout=30)
                others = [subprocess.Popen(base + [part, "--worker", str(k)] + extra + cfg,
                                           start_new_session=True, preexec_fn=_die_with_parent)
                          for k in range(1, workers)]
                procs.extend(others)
                _wait_workers_listening(others, net.switch.listen.port, procs, timeout=30)
                continue
            # Each part in its own session, so a Ctrl-C reaches only this parent,
            # which stops the parts in order; each part dies with its parent.
            procs.append(subprocess.Popen(base + [part] + cfg, start_new_session=True,
                                          preexec_fn=_die_with_parent))
            _wait_accepting(_part_endpoints(net, part), procs, timeout=30)
    except CliError:
        stop_parts()
        raise
    print("ready", flush=True)
    # Run until a signal, or until a part dies on its own (then stop the rest).
    while not stopping:
        dead = [pr for pr in procs if pr.poll() is not None]
        if dead:
            print(f"cardswitch up: a part exited with code {dead[0].returncode}; stopping",
                  file=sys.stderr, flush=True)
            stop_parts()
            return 1
        time.sleep(0.1)
    return stop_parts()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when `up` dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def cmd_serve(args) -> int:
    """One part of the network in this process (what `up` runs per part)."""
    net = _load(args.config)
    _setup_logging(args.verbose)
    _uvloop()
    if args.part == "switch":
        if not 0 <= args.worker < MAX_WORKERS:
            raise CliError(f"--worker {args.worker}: expected 0 to {MAX_WORKERS - 1}")
        problem = workers_problem(net, args.workers)
        if problem:
            raise CliError(problem)
        return asyncio.run(_serve_switch(net, args.worker, args.workers > 1))
    if args.part == "banks":
        return asyncio.run(_serve_until_signal(_run_banks(net)))
    if args.part == "hsm":
        from cardswitch.hsm_sim.server import run_hsm

        return asyncio.run(_serve_until_signal(run_hsm(net)))
    raise CliError(f"unknown part {args.part!r}")


async def _until_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _serve_switch(net: Network, worker: int = 0, reuse_port: bool = False) -> int:
    from cardswitch.switch.app import SwitchApp

    app = SwitchApp(net, worker=worker, reuse_port=reuse_port)
    await app.start()
    await _until_signal()
    await app.stop()
    return 0


async def _run_banks(net: Network) -> None:
    from cardswitch.issuer_sim.server import run_banks

    await run_banks(net, net.switch.data_dir)


async def _serve_until_signal(coro) -> int:
    """Run a server coroutine until SIGTERM/SIGINT, then cancel it (it drains)."""
    task = asyncio.create_task(coro)
    stop = asyncio.create_task(_until_signal())
    done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:                 # the server ended on its own: an error
        stop.cancel()
        task.result()
        return 1
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return 0


# -- txn -------------------------------------------------------------------------------


def cmd_txn(args) -> int:
    from cardswitch.txncmd import run_txn

    net = _load(args.config)
    return asyncio.run(run_txn(net, args))


# -- cutover ---------------------------------------------------------------------------


def cmd_cutover(args) -> int:
    from cardswitch.switch.cutover import CutoverError, request_cutover

    net = _load(args.config)
    try:
        old, new = request_cutover(net.switch.journal, net.switch.data_dir)
    except CutoverError as e:
        raise CliError(str(e)) from None
    print(f"business date {old} -> {new}")
    return 0


# -- demo ------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from cardswitch.demo import run_demo

    return run_demo(args)


# -- issuer-sim export --------------------------------------------------------------------


def cmd_issuer_export(args) -> int:
    from cardswitch.issuer_sim.export import export_day

    net = _load(args.config)
    try:
        net.bank(args.issuer)
    except KeyError:
        raise CliError(f"--issuer: no bank {args.issuer!r} in {net.source}") from None
    from cardswitch.issuer_sim.export import ExportError

    try:
        n = export_day(net.switch.data_dir, args.issuer, args.date, args.out)
    except ExportError as e:
        raise CliError(str(e)) from None
    print(f"{args.out}: {n} transactions of {args.issuer} on {args.date}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cardswitch", description="Card payment switch and POS acquiring engine.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("-c", "--config", metavar="FILE", help="network file (default: the built-in demo network)")
        return sp

    sp = with_config(sub.add_parser("check", help="validate a network file and print what it describes"))
    sp.set_defaults(func=cmd_check)

    sp = with_config(sub.add_parser("up", help="start the switch and the simulators the file names; prints `ready`"))
    sp.add_argument("--only", metavar="PARTS", help="comma-separated parts to start: hsm, banks, switch")
    sp.add_argument("--workers", type=int, default=1, metavar="N",
                    help="switch processes sharing [switch] listen (SO_REUSEPORT); N > 1 needs a "
                         "postgresql:// journal and [switch] redis; worker 0 serves the admin port")
    sp.set_defaults(func=cmd_up)

    sp = with_config(sub.add_parser("serve", help=argparse.SUPPRESS))
    sp.add_argument("part", choices=PARTS)
    sp.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)    # node index K (0-9)
    sp.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)   # > 1: SO_REUSEPORT
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(func=cmd_serve)

    from cardswitch.terminal import KINDS

    sp = with_config(sub.add_parser("txn", help="send one transaction from a simulated terminal"))
    sp.add_argument("kind", choices=sorted(KINDS))
    sp.add_argument("--pan", required=True)
    sp.add_argument("--pin", help="PIN to enter (encrypted under the terminal's TPK)")
    sp.add_argument("--amount", type=int, default=0, help="minor units")
    sp.add_argument("--terminal", required=True, help="terminal ID (field 41)")
    sp.add_argument("--to", dest="to_pan", help="receiving card of a transfer")
    sp.add_argument("--bill", help="biller and bill reference of a bill payment (field 62)")
    sp.add_argument("--original", help="void/completion/reversal: the original's MTI:STAN:field7")
    sp.add_argument("--stan", help="field 11 (default: from the clock)")
    sp.add_argument("--batch", type=int, default=1, help="batch number (field 60)")
    sp.add_argument("--timeout", type=float, default=30.0)
    sp.set_defaults(func=cmd_txn)

    sp = with_config(sub.add_parser("cutover", help="end the current business day now"))
    sp.set_defaults(func=cmd_cutover)

    sp = sub.add_parser("demo", help="run a business day on the demo network and print the results")
    sp.set_defaults(func=cmd_demo)

    isim = sub.add_parser("issuer-sim", help="simulated issuer tools")
    isub = isim.add_subparsers(dest="isim_command", required=True)
    sp = with_config(isub.add_parser("export", help="the simulated issuer's own record of a day (CSV)"))
    sp.add_argument("--issuer", required=True)
    sp.add_argument("--date", required=True, help="business date YYYY-MM-DD")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_issuer_export)

    from cardswitch.settlement.commands import add_settlement_commands

    add_settlement_commands(sub, with_config)   # settle, reconcile
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CliError as e:
        print(f"cardswitch: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
