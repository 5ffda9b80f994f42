"""The switch of a network file with its admin server, in its own process.

For the browser test: ``python serve_admin.py NETWORK.toml`` starts
``SwitchApp`` (the HSM and the banks must already run: `cardswitch up
--only hsm,banks`), attaches ``SwitchMetrics`` and an ``AdminServer`` unless
the switch already has them, prints ``ready <admin port>`` and runs until
SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from cardswitch.netfile import load_network
from cardswitch.switch.admin import AdminServer
from cardswitch.switch.app import SwitchApp
from cardswitch.switch.metrics import SwitchMetrics


async def main(path: str) -> int:
    app = SwitchApp(load_network(path))
    await app.start()
    metrics = getattr(app, "metrics", None)
    if metrics is None:
        metrics = SwitchMetrics()
        metrics.attach(app)
        app.pipeline.stats = metrics
    admin = getattr(app, "admin", None)
    own = admin is None
    if own:
        admin = AdminServer(app, metrics)
        await admin.start()
    print(f"ready {admin.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if own:
        await admin.stop()
    await app.stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(asyncio.run(main(sys.argv[1])))
