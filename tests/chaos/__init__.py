"""Fault-injection tests: a fleet of real processes, and the invariants after.

Each test breaks something on purpose (kills, freezes, slow or refusing servers, clients that
leave), then `settled` (invariants.py) checks what must hold whatever happened: nothing the
balancer accepted is still running, every server's slots are idle, and the balancer lists
exactly the agents that are alive.
"""
