"""Several `rower sim` servers and `rower agent`s in one process, to spare a 2-core machine.

`python -m bench.fleethost SPEC.json` where the spec is
`{"sims": [{"port", "slots", "decode", "prefill", "slowdown", "model"}...],
  "agents": [{"target": "127.0.0.1:P", "management": "127.0.0.1:M", "interval_ms"}...]}`;
`management` may be a list (the agent reports to each balancer). Agents may watch sims of this
process or real llama-servers elsewhere. Runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

from aiohttp import web

from rower.addresses import Address
from rower.agent.agent import Agent, AgentConfig
from rower.sim.responses import Identity
from rower.sim.server import Sim, SimConfig
from rower.sim.timing import Speed


async def main(spec: dict[str, Any]) -> None:
    runners: list[web.AppRunner] = []
    for item in spec.get("sims", []):
        config = SimConfig(
            identity=Identity(
                model=item.get("model", "sim"),
                n_ctx=item.get("ctx", 8192),
                total_slots=item["slots"],
            ),
            speed=Speed(
                prefill_tokens_per_second=item.get("prefill", 2000.0),
                decode_tokens_per_second=item["decode"],
                decode_slowdown=item.get("slowdown", 0.0),
            ),
            default_n_predict=item.get("n_predict", 16),
        )
        runner = web.AppRunner(
            Sim(config).application(), handler_cancellation=True, access_log=None
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", item["port"], backlog=4096).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    agents = []
    for index, item in enumerate(spec.get("agents", [])):
        target = Address.parse(item["target"])
        managements = item["management"]
        if isinstance(managements, str):
            managements = [managements]
        agent = Agent(
            AgentConfig(
                management_addrs=[Address.parse(m) for m in managements],
                local_llamacpp_addr=target,
                external_llamacpp_addr=target,
                name=f"bench-{index}",
                monitoring_interval_ms=item.get("interval_ms", 1000),
            )
        )
        agents.append(asyncio.create_task(agent.run(stop)))
    print("ready", flush=True)
    await stop.wait()
    if agents:
        await asyncio.wait(agents, timeout=3)
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    import uvloop

    with open(sys.argv[1]) as file:
        uvloop.run(main(json.load(file)))
