"""Serving: a websocket policy server and client speaking openpi's wire protocol (msgpack-numpy).

Classes are re-exported here; the wire functions stay in `eqx_energy.serve.wire`.
"""

from eqx_energy.serve.client import PolicyClient as PolicyClient
from eqx_energy.serve.server import Policy as Policy
from eqx_energy.serve.server import PolicyServer as PolicyServer
from eqx_energy.serve.toy_policy import ToyPolicy as ToyPolicy
