"""Node numbers: [switch] node_id + worker index picks the RRN range (no start-up needed)."""

import dataclasses

import pytest

from cardswitch.netfile import load_network, parse_network
from cardswitch.switch.app import RRN_NODE_SPAN, SwitchApp


class StateOnly:
    def __init__(self):
        self.state = {}

    def get_state(self, key):
        return self.state.get(key)

    def set_state(self, key, value, loop=None):
        self.state[key] = value

    def flush(self):
        pass


def app_for(node_id: int, worker: int) -> SwitchApp:
    net = load_network(None)
    net = dataclasses.replace(net, switch=dataclasses.replace(net.switch, node_id=node_id))
    app = SwitchApp(net, worker=worker)
    app.journal = StateOnly()
    return app


def test_node_id_and_worker_add_up_to_the_rrn_range():
    app = app_for(3, 1)
    assert app.node == 4
    assert app._reserve_rrn("6333", 0) == 4 * RRN_NODE_SPAN
    assert app._reserve_rrn("6333", 4 * RRN_NODE_SPAN + 10_000) == 4 * RRN_NODE_SPAN + 10_000
    assert app.journal.state == {"rrn:4:6333": str(4 * RRN_NODE_SPAN + 10_000)}


def test_node_zero_keeps_the_plain_key():
    app = app_for(0, 0)
    app._reserve_rrn("6333", 10_000)
    assert app.journal.state == {"rrn:6333": "10000"}


def test_a_node_beyond_nine_is_refused():
    with pytest.raises(ValueError, match="node 10"):
        app_for(9, 1)


def test_node_id_is_read_from_the_network_file_and_bounded():
    text = '[switch]\nnode_id = 2\n'
    assert parse_network(text, "n.toml").switch.node_id == 2
    with pytest.raises(ValueError, match="node_id"):
        parse_network('[switch]\nnode_id = 12\n', "n.toml")
