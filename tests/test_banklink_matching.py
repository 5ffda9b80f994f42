"""The pure pieces of the bank link: STAN allocation, the in-flight table, backoff."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cardswitch.switch.backoff import Backoff
from cardswitch.switch.banklink import netmgmt_answer, netmgmt_request, unsolicited_answer
from cardswitch.switch.matching import STAN_MAX, InFlight, InFlightFull, expected_class


def test_stans_count_up_from_000001_and_wrap():
    f = InFlight(first=999_998)
    assert [f.next_stan() for _ in range(3)] == ["999998", "999999", "000001"]
    g = InFlight()
    assert g.next_stan() == "000001" and g.next_stan() == "000002"


def test_stans_in_flight_are_skipped():
    f = InFlight()
    for s in ("000001", "000002", "000004"):
        f.add(s, "0200", "", object())
    assert f.next_stan() == "000003"
    assert f.next_stan() == "000005"


def test_adding_a_stan_twice_is_refused():
    f = InFlight()
    f.add("000001", "0200", "", 1)
    with pytest.raises(KeyError):
        f.add("000001", "0200", "", 2)


def test_limit():
    f = InFlight(limit=2)
    for _ in range(2):
        s = f.next_stan()
        f.add(s, "0200", "", s)
    with pytest.raises(InFlightFull):
        f.next_stan()


@pytest.mark.parametrize("req,resp,matches", [
    ("0200", "0210", True),
    ("0201", "0210", True),      # a repeat is answered like its original
    ("0200", "0211", True),      # same class
    ("0200", "0230", False),
    ("0200", "0430", False),
    ("0420", "0430", True),
    ("0421", "0430", True),
    ("0420", "0210", False),     # the answer to a reversal never matches its original, and back
    ("0100", "0110", True),
    ("0800", "0810", True),
])
def test_match_by_response_class(req, resp, matches):
    f = InFlight()
    f.add("000123", req, "RRN000000001", "item")
    got = f.match({"t": resp, "11": "000123", "37": "RRN000000001"})
    assert (got == "item") is matches
    assert len(f) == (0 if matches else 1)


def test_match_needs_the_same_rrn_and_stan():
    f = InFlight()
    f.add("000123", "0200", "RRN000000001", "item")
    assert f.match({"t": "0210", "11": "000123", "37": "RRN000000002"}) is None
    assert f.match({"t": "0210", "11": "000123"}) is None
    assert f.match({"t": "0210", "11": "000124", "37": "RRN000000001"}) is None
    assert f.match({"t": "0210", "37": "RRN000000001"}) is None
    assert f.match({"t": "0210", "11": "000123", "37": "RRN000000001"}) == "item"
    # network management carries no 37 on either side
    f.add("000200", "0800", "", "echo")
    assert f.match({"t": "0810", "11": "000200", "39": "00"}) == "echo"


def test_pop_checks_the_item():
    f = InFlight()
    a, b = object(), object()
    f.add("000001", "0200", "", a)
    assert f.pop("000001", b) is None and "000001" in f
    assert f.pop("000001", a) is a and len(f) == 0
    assert f.pop("000001") is None


def test_expected_class():
    assert expected_class("0200") == "021"
    assert expected_class("0420") == "043"
    assert expected_class("0800") == "081"


class InFlightMachine(RuleBasedStateMachine):
    """Random allocations and completions: an allocated STAN is never one in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.f = InFlight(first=STAN_MAX - 20, limit=0)
        self.model: dict[str, object] = {}
        self.last: int | None = None

    @rule(mti=st.sampled_from(["0100", "0200", "0420", "0800"]), rrn=st.text("0123456789", max_size=12))
    def send(self, mti, rrn):
        stan = self.f.next_stan()
        assert len(stan) == 6 and stan.isdigit() and 1 <= int(stan) <= STAN_MAX
        assert stan not in self.model
        if self.last is not None:
            # the next free STAN after the previous one, cyclically
            n = self.last % STAN_MAX + 1
            while "%06d" % n in self.model:
                n = n % STAN_MAX + 1
            assert int(stan) == n
        self.last = int(stan)
        item = object()
        self.f.add(stan, mti, rrn, item)
        self.model[stan] = (mti, rrn, item)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def answer(self, data):
        stan = data.draw(st.sampled_from(sorted(self.model)))
        mti, rrn, item = self.model.pop(stan)
        resp_mti = mti[:2] + str(int(mti[2]) + 1) + data.draw(st.sampled_from("01"))
        assert self.f.match({"t": resp_mti, "11": stan, "37": rrn}) is item

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def time_out(self, data):
        stan = data.draw(st.sampled_from(sorted(self.model)))
        _, _, item = self.model.pop(stan)
        assert self.f.pop(stan, item) is item

    @rule(stan=st.integers(1, STAN_MAX).map(lambda n: "%06d" % n))
    def stray_answer(self, stan):
        if stan not in self.model:
            assert self.f.match({"t": "0210", "11": stan, "37": ""}) is None

    @invariant()
    def same_size(self):
        assert len(self.f) == len(self.model)
        assert set(self.f.stans()) == set(self.model)


TestInFlightMachine = InFlightMachine.TestCase
TestInFlightMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@given(st.sets(st.integers(1, STAN_MAX), max_size=200), st.integers(1, STAN_MAX))
def test_next_stan_skips_any_in_flight_set(busy, first):
    f = InFlight(first=first)
    for n in busy:
        f.add("%06d" % n, "0200", "", n)
    seen = set()
    for _ in range(50):
        s = f.next_stan()
        assert int(s) not in busy and s not in seen
        seen.add(s)


# -- backoff ---------------------------------------------------------------------

def test_backoff_doubles_to_the_maximum():
    b = Backoff(rand=lambda: 0.0)
    delays = [b.next() for _ in range(9)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    b.reset()
    assert b.next() == pytest.approx(0.1)


@given(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=30))
def test_backoff_jitter_stays_within_half_and_full_delay(rands):
    it = iter(rands)
    b = Backoff(rand=lambda: next(it))
    for i in range(len(rands)):
        d = b.next()
        base = min(5.0, 0.1 * 2 ** i)
        assert base * 0.5 - 1e-12 <= d <= base + 1e-12


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(initial=0)
    with pytest.raises(ValueError):
        Backoff(initial=1, maximum=0.5)


# -- message builders ---------------------------------------------------------------

def test_netmgmt_messages():
    req = netmgmt_request("001", "99900001")
    assert req["t"] == "0800" and req["70"] == "001" and req["33"] == "99900001"
    assert len(req["7"]) == 10 and req["7"].isdigit()
    ans = netmgmt_answer({"t": "0800", "7": "1128101010", "11": "000009", "70": "301", "33": "123"})
    assert ans == {"t": "0810", "7": "1128101010", "11": "000009", "33": "123", "39": "00", "70": "301"}


def test_unsolicited_answer_echoes_and_declines():
    ans = unsolicited_answer({"t": "0200", "2": "4761739001010119", "3": "000000", "11": "000001",
                              "37": "R", "52": "00"})
    assert ans == {"t": "0210", "2": "4761739001010119", "3": "000000", "11": "000001", "37": "R", "39": "12"}
